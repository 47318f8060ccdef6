package fence

import (
	"context"
	"fmt"
	"reflect"
	"sync"
	"time"

	controlplanev1 "github.com/siderolabs/cluster-api-control-plane-provider-talos/api/v1alpha3"
	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/record"
	clusterv1 "sigs.k8s.io/cluster-api/api/v1beta1"
	"sigs.k8s.io/cluster-api/util/conditions"
	"sigs.k8s.io/cluster-api/util/patch"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/sovra-dev/sovra/daemon/membership"
)

const (
	// DefaultGrace is how long a cluster with labelled SovraNodes waits for
	// an agent to win its bootstrap lease once CACPPT could bootstrap it.
	DefaultGrace = 5 * time.Minute
	// AnnotationWaitForAgents on a TalosControlPlane ("true") makes the
	// fence wait the grace period for agents even while no SovraNode is
	// labelled with the cluster yet (nodes enroll only once they booted,
	// often after their machines got addresses).
	AnnotationWaitForAgents = "sovra.dev/wait-for-agents"
	// DefaultPoll is how often an unbootstrapped control plane is looked at
	// again (the fence does not watch Leases: agents move them).
	DefaultPoll = 5 * time.Second

	// Event reasons on the TalosControlPlane.
	ReasonAgentBootstrapped    = "BootstrappedBySovraAgent"
	ReasonProviderLease        = "BootstrapLeaseCommitted"
	ReasonProviderBootstrapped = "BootstrapLeaseFinal"
	ReasonLeaseUnavailable     = "BootstrapLeaseUnavailable"
	ReasonLeaseDeleted         = "BootstrapLeaseDeleted"
)

// Controller keeps fenced control planes moving: it marks a control plane
// bootstrapped when an agent bootstrapped its cluster, commits the lease to
// CACPPT's target when it is CACPPT's turn, and makes the lease final once
// CACPPT bootstrapped.
type Controller struct {
	Client client.Client
	Leases Leases
	Events record.EventRecorder
	Log    *zap.Logger
	// Grace is how long to wait for agents (DefaultGrace when zero); Poll
	// how often to look again (DefaultPoll when zero).
	Grace, Poll time.Duration
	// Now tells the time; nil is time.Now.
	Now func() time.Time

	mu sync.Mutex // guards readySince
	// readySince is when each control plane was first seen ready for
	// CACPPT to bootstrap; a failover starts the grace period again.
	readySince map[types.UID]time.Time
	// said is the last waiting reason logged per control plane.
	said lastSaid[types.UID]
}

// SetupWithManager watches TalosControlPlanes and their Machines.
func (c *Controller) SetupWithManager(mgr ctrl.Manager) error {
	return ctrl.NewControllerManagedBy(mgr).
		Named("sovra-bootstrap-fence").
		For(&controlplanev1.TalosControlPlane{}).
		Owns(&clusterv1.Machine{}).
		Complete(c)
}

// action is what the fence does for a control plane.
type action int

const (
	actWait action = iota
	// actMarkBootstrapped: an agent bootstrapped; tell CACPPT.
	actMarkBootstrapped
	// actCommit: commit the lease to CACPPT's target.
	actCommit
	// actFinish: CACPPT bootstrapped on its committed lease.
	actFinish
)

// view is what the fence knows of one control plane.
type view struct {
	Cluster, Holder string
	Bootstrapped    bool
	// Marked is whether the MachinesBootstrapped condition is True.
	Marked     bool
	InitConfig bool
	Lease      membership.LeaseState
	LeaseFound bool
	// Target is CACPPT's target; Ready is whether every desired
	// control-plane Machine exists and has an address.
	Target string
	Ready  bool
	// Enrolled counts the SovraNodes labelled with the cluster;
	// WaitForAgents is the control plane's AnnotationWaitForAgents.
	Enrolled      int
	WaitForAgents bool
	// ReadySince is when Ready was first seen.
	Now, ReadySince time.Time
	Grace           time.Duration
}

// decide is the fence's transition function: the action, the time to look
// again (zero: only on change) and why.
func decide(v view, poll time.Duration) (action, time.Duration, string) {
	l := v.Lease
	committed := v.LeaseFound && l.Phase != membership.PhaseHeld
	ours := v.LeaseFound && l.Holder == v.Holder
	switch {
	case v.Bootstrapped && !committed && v.LeaseFound && !ours && v.Now.Before(l.Expires()):
		return actWait, l.Expires().Sub(v.Now), "the control plane is bootstrapped; waiting for the lease " + describe(l.Holder, l.HolderAddress) + " holds to expire"
	case v.Bootstrapped && !committed:
		return actCommit, 0, "the control plane is bootstrapped and no lease records it: taking the lease so that no agent bootstraps a second etcd"
	case v.Bootstrapped && committed && !ours && !v.Marked:
		// A reconcile of CACPPT that started before the control plane was
		// marked wrote its condition back: mark it again.
		return actMarkBootstrapped, 0, describe(l.Holder, l.HolderAddress) + " bootstrapped the cluster"
	case v.Bootstrapped && ours && l.Phase == membership.PhaseBootstrapping:
		return actFinish, 0, "the provider bootstrapped " + l.HolderAddress
	case v.Bootstrapped:
		return actWait, 0, "bootstrapped"
	case v.InitConfig && !v.LeaseFound:
		return actCommit, 0, "the control plane uses init configs, whose first node bootstraps itself: no agent may bootstrap"
	case v.InitConfig:
		return actWait, 0, "init configs: the provider marks the control plane bootstrapped itself"
	case committed && !ours && l.Phase == membership.PhaseBootstrapped:
		return actMarkBootstrapped, 0, describe(l.Holder, l.HolderAddress) + " bootstrapped the cluster"
	case committed && !ours:
		return actWait, poll, describe(l.Holder, l.HolderAddress) + " is bootstrapping the cluster"
	case committed:
		return actWait, poll, "the provider may bootstrap " + l.HolderAddress
	case v.LeaseFound && !ours && v.Now.Before(l.Expires()):
		return actWait, min(poll, l.Expires().Sub(v.Now)), describe(l.Holder, l.HolderAddress) + " holds the lease"
	case !v.Ready:
		return actWait, poll, "waiting for every control-plane Machine to have an address"
	case v.Enrolled == 0 && !v.WaitForAgents:
		return actCommit, 0, "no SovraNode is labelled with the cluster: the provider bootstraps " + v.Target
	case !v.Now.Before(v.ReadySince.Add(v.Grace)):
		return actCommit, 0, fmt.Sprintf("no agent won the lease within %s of the control plane being ready: the provider bootstraps %s", v.Grace, v.Target)
	}
	return actWait, min(poll, v.ReadySince.Add(v.Grace).Sub(v.Now)),
		fmt.Sprintf("%d labelled node(s), %s=%t: waiting up to %s for agents to win the lease", v.Enrolled, AnnotationWaitForAgents, v.WaitForAgents, v.Grace)
}

// Reconcile implements reconcile.Reconciler.
func (c *Controller) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	var tcp controlplanev1.TalosControlPlane
	if err := c.Client.Get(ctx, req.NamespacedName, &tcp); err != nil {
		if apierrors.IsNotFound(err) {
			return ctrl.Result{}, nil
		}
		return ctrl.Result{}, err
	}
	if !tcp.DeletionTimestamp.IsZero() {
		c.forget(tcp.UID)
		return ctrl.Result{}, c.release(ctx, &tcp)
	}
	v, err := c.view(ctx, &tcp)
	if err != nil {
		return ctrl.Result{}, err
	}
	if v.Cluster == "" {
		return ctrl.Result{RequeueAfter: c.poll()}, nil
	}
	act, after, why := decide(v, c.poll())
	log := c.Log.With(zap.String("taloscontrolplane", req.String()), zap.String("cluster", v.Cluster))
	switch act {
	case actWait:
		if c.said.changed(tcp.UID, why) {
			log.Info("bootstrap fence: " + why)
		}
		return ctrl.Result{RequeueAfter: after}, nil
	case actMarkBootstrapped:
		return ctrl.Result{}, c.markBootstrapped(ctx, log, &tcp, why)
	case actCommit:
		return c.commit(ctx, log, &tcp, v, why)
	case actFinish:
		d, err := c.Leases.FinishFor(ctx, v.Cluster, v.Holder, v.Lease.HolderAddress)
		if err != nil {
			return ctrl.Result{}, err
		}
		if d.Granted {
			log.Info("bootstrap fence: the lease is final: "+why, zap.String("address", v.Lease.HolderAddress))
			c.Events.Event(&tcp, corev1.EventTypeNormal, ReasonProviderBootstrapped, "bootstrap lease of cluster "+v.Cluster+" is final: "+why)
		}
		return ctrl.Result{}, nil
	}
	return ctrl.Result{}, nil
}

// view reads what decide needs.
func (c *Controller) view(ctx context.Context, tcp *controlplanev1.TalosControlPlane) (view, error) {
	v := view{
		Cluster: ClusterName(tcp), Holder: Holder(tcp), Bootstrapped: tcp.Status.Bootstrapped,
		Marked:        conditions.IsTrue(tcp, controlplanev1.MachinesBootstrapped),
		InitConfig:    !reflect.ValueOf(tcp.Spec.ControlPlaneConfig.InitConfig).IsZero(),
		WaitForAgents: tcp.Annotations[AnnotationWaitForAgents] == "true",
		Now:           c.now(), Grace: c.Grace,
	}
	if v.Grace <= 0 {
		v.Grace = DefaultGrace
	}
	if v.Cluster == "" {
		return v, nil
	}
	var err error
	if v.Lease, v.LeaseFound, err = c.Leases.Holder(ctx, v.Cluster); err != nil {
		return v, err
	}
	var machines clusterv1.MachineList
	if err := c.Client.List(ctx, &machines, client.InNamespace(tcp.Namespace),
		client.MatchingLabels{clusterv1.ClusterNameLabel: v.Cluster, clusterv1.MachineControlPlaneLabel: ""}); err != nil {
		return v, fmt.Errorf("listing the control-plane machines of cluster %s: %w", v.Cluster, err)
	}
	v.Target, v.Ready = Target(machines.Items)
	v.Ready = v.Ready && len(machines.Items) == int(tcp.Spec.GetReplicas())
	c.mu.Lock()
	if c.readySince == nil {
		c.readySince = map[types.UID]time.Time{}
	}
	switch {
	case !v.Ready:
		delete(c.readySince, tcp.UID)
	case c.readySince[tcp.UID].IsZero():
		c.readySince[tcp.UID] = v.Now
	}
	v.ReadySince = c.readySince[tcp.UID]
	c.mu.Unlock()
	if !v.Bootstrapped && v.Ready {
		if v.Enrolled, err = c.Leases.Enrolled(ctx, v.Cluster); err != nil {
			return v, err
		}
	}
	return v, nil
}

// markBootstrapped tells CACPPT that an agent bootstrapped the cluster: it
// then never calls Bootstrap itself.
func (c *Controller) markBootstrapped(ctx context.Context, log *zap.Logger, tcp *controlplanev1.TalosControlPlane, why string) error {
	helper, err := patch.NewHelper(tcp, c.Client)
	if err != nil {
		return err
	}
	wasBootstrapped := tcp.Status.Bootstrapped
	tcp.Status.Bootstrapped = true
	conditions.MarkTrue(tcp, controlplanev1.MachinesBootstrapped)
	if err := helper.Patch(ctx, tcp, patch.WithOwnedConditions{Conditions: []clusterv1.ConditionType{controlplanev1.MachinesBootstrapped}}); err != nil {
		return fmt.Errorf("marking TalosControlPlane %s/%s bootstrapped: %w", tcp.Namespace, tcp.Name, err)
	}
	log.Info("bootstrap fence: marked the control plane bootstrapped: " + why)
	if !wasBootstrapped {
		c.Events.Event(tcp, corev1.EventTypeNormal, ReasonAgentBootstrapped, why)
	}
	c.forget(tcp.UID)
	return nil
}

// commit commits the lease to CACPPT's target.
func (c *Controller) commit(ctx context.Context, log *zap.Logger, tcp *controlplanev1.TalosControlPlane, v view, why string) (ctrl.Result, error) {
	d, err := c.Leases.CommitFor(ctx, v.Cluster, v.Holder, v.Target)
	if err != nil {
		return ctrl.Result{}, err
	}
	if !d.Granted {
		// An agent won it in between: judge again on its lease.
		log.Info("bootstrap fence: the lease went to another holder first: "+d.Message, zap.String("holder", d.Lease.Holder))
		c.Events.Event(tcp, corev1.EventTypeNormal, ReasonLeaseUnavailable, d.Message)
		return ctrl.Result{RequeueAfter: c.poll()}, nil
	}
	if v.Bootstrapped {
		if _, err := c.Leases.FinishFor(ctx, v.Cluster, v.Holder, v.Target); err != nil {
			return ctrl.Result{}, err
		}
	}
	log.Info("bootstrap fence: committed the bootstrap lease for the provider: "+why, zap.String("address", v.Target))
	c.Events.Event(tcp, corev1.EventTypeNormal, ReasonProviderLease, why)
	return ctrl.Result{RequeueAfter: c.poll()}, nil
}

// release deletes the committed bootstrap lease of a control plane that is
// being deleted, so that a cluster created again under the same name can be
// bootstrapped. A lease that is only held is left to expire.
func (c *Controller) release(ctx context.Context, tcp *controlplanev1.TalosControlPlane) error {
	cluster := ClusterName(tcp)
	if cluster == "" {
		return nil
	}
	l, found, err := c.Leases.Holder(ctx, cluster)
	if err != nil || !found || l.Phase == membership.PhaseHeld {
		return err
	}
	deleted, err := c.Leases.Forget(ctx, cluster, l.Holder)
	if err != nil || !deleted {
		return err
	}
	c.Log.Info("bootstrap fence: deleted the bootstrap lease with its control plane",
		zap.String("taloscontrolplane", tcp.Namespace+"/"+tcp.Name), zap.String("cluster", cluster), zap.String("holder", l.Holder))
	c.Events.Event(tcp, corev1.EventTypeNormal, ReasonLeaseDeleted, "deleted the bootstrap lease of cluster "+cluster+", held by "+describe(l.Holder, l.HolderAddress))
	return nil
}

func (c *Controller) forget(uid types.UID) {
	c.mu.Lock()
	delete(c.readySince, uid)
	c.mu.Unlock()
	c.said.forget(uid)
}

func (c *Controller) poll() time.Duration {
	if c.Poll > 0 {
		return c.Poll
	}
	return DefaultPoll
}

func (c *Controller) now() time.Time {
	if c.Now != nil {
		return c.Now()
	}
	return time.Now()
}
