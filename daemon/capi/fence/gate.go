package fence

import (
	"context"
	"fmt"
	"reflect"
	"strings"
	"sync"

	controlplanev1 "github.com/siderolabs/cluster-api-control-plane-provider-talos/api/v1alpha3"
	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	clusterv1 "sigs.k8s.io/cluster-api/api/v1beta1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/sovra-dev/sovra/daemon/membership"
	"github.com/sovra-dev/sovra/daemon/metrics"
)

// Leases is what the fence needs of the bootstrap leases
// (membership.Service).
type Leases interface {
	Holder(ctx context.Context, cluster string) (membership.LeaseState, bool, error)
	CommitFor(ctx context.Context, cluster, holder, address string) (membership.Decision, error)
	FinishFor(ctx context.Context, cluster, holder, address string) (membership.Decision, error)
	Enrolled(ctx context.Context, cluster string) (int, error)
	Forget(ctx context.Context, cluster, holder string) (bool, error)
}

// Gate hands CACPPT a cluster's talosconfig only when the reconcile asking
// for it cannot bootstrap any node but the bootstrap lease's. Wrap CACPPT's
// reconciler with Reconciler, its client with Client and its API reader with
// Reader: what CACPPT reads through them in a reconcile is the evidence.
type Gate struct {
	Leases Leases
	Log    *zap.Logger

	// refused is the last refusal logged per cluster.
	refused lastSaid[string]
}

// observation is what CACPPT read in one reconcile.
type observation struct {
	mu sync.Mutex
	// tcps is how many TalosControlPlanes it read; mayBootstrap whether any
	// of them may still be bootstrapped by it (not bootstrapped, no init
	// config: CACPPT's condition for calling bootstrapCluster).
	tcps         int
	mayBootstrap bool
	// targets holds, per Machine list it read, the address it would
	// bootstrap from that list ("" when it would not).
	targets []string
}

type observationKey struct{}

func observationFrom(ctx context.Context) *observation {
	o, _ := ctx.Value(observationKey{}).(*observation)
	return o
}

// Reconciler gives every reconcile of inner a fresh observation.
func (g *Gate) Reconciler(inner reconcile.Reconciler) reconcile.Reconciler {
	return reconcile.Func(func(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
		return inner.Reconcile(context.WithValue(ctx, observationKey{}, &observation{}), req)
	})
}

// Reader records the TalosControlPlanes read through r (CACPPT reads its
// object through its API reader).
func (g *Gate) Reader(r client.Reader) client.Reader { return &observingReader{Reader: r} }

// Client records the Machine lists read through c and gates the reads of
// talosconfig Secrets.
func (g *Gate) Client(c client.Client) client.Client { return &gatedClient{Client: c, gate: g} }

type observingReader struct{ client.Reader }

func (r *observingReader) Get(ctx context.Context, key client.ObjectKey, obj client.Object, opts ...client.GetOption) error {
	err := r.Reader.Get(ctx, key, obj, opts...)
	if tcp, ok := obj.(*controlplanev1.TalosControlPlane); ok && err == nil {
		if o := observationFrom(ctx); o != nil {
			o.mu.Lock()
			o.tcps++
			o.mayBootstrap = o.mayBootstrap || mayBootstrap(tcp)
			o.mu.Unlock()
		}
	}
	return err
}

type gatedClient struct {
	client.Client
	gate *Gate
}

func (c *gatedClient) List(ctx context.Context, list client.ObjectList, opts ...client.ListOption) error {
	err := c.Client.List(ctx, list, opts...)
	if ml, ok := list.(*clusterv1.MachineList); ok && err == nil {
		if o := observationFrom(ctx); o != nil {
			target, _ := Target(ml.Items)
			o.mu.Lock()
			o.targets = append(o.targets, target)
			o.mu.Unlock()
		}
	}
	return err
}

func (c *gatedClient) Get(ctx context.Context, key client.ObjectKey, obj client.Object, opts ...client.GetOption) error {
	if _, ok := obj.(*corev1.Secret); ok {
		if cluster, ok := strings.CutSuffix(key.Name, talosconfigSuffix); ok && cluster != "" {
			if err := c.gate.admit(ctx, cluster); err != nil {
				return err
			}
		}
	}
	return c.Client.Get(ctx, key, obj, opts...)
}

// mayBootstrap is CACPPT's condition for calling bootstrapCluster.
func mayBootstrap(tcp *controlplanev1.TalosControlPlane) bool {
	return !tcp.Status.Bootstrapped && reflect.ValueOf(tcp.Spec.ControlPlaneConfig.InitConfig).IsZero()
}

// admit decides a talosconfig read for cluster in the reconcile of ctx.
func (g *Gate) admit(ctx context.Context, cluster string) error {
	o := observationFrom(ctx)
	var (
		tcps    int
		may     bool
		targets []string
	)
	if o != nil {
		o.mu.Lock()
		tcps, may, targets = o.tcps, o.mayBootstrap, append([]string(nil), o.targets...)
		o.mu.Unlock()
	}
	if tcps > 0 && !may {
		return nil // bootstrapped: this reconcile never calls Bootstrap
	}
	lease, found, err := g.Leases.Holder(ctx, cluster)
	if err != nil {
		return g.refuse(cluster, fmt.Sprintf("cannot read the bootstrap lease: %v", err))
	}
	reason, ok := admits(cluster, tcps, targets, lease, found)
	if !ok {
		return g.refuse(cluster, reason)
	}
	g.refused.forget(cluster)
	return nil
}

// admits decides whether a reconcile that read tcps TalosControlPlanes,
// none of them bootstrapped, and Machine lists with targets may reach the
// nodes of cluster, given its lease.
func admits(cluster string, tcps int, targets []string, lease membership.LeaseState, found bool) (string, bool) {
	switch {
	case tcps == 0:
		return "the talosconfig was asked for outside a TalosControlPlane reconcile", false
	case !found:
		return fmt.Sprintf("waiting for the bootstrap lease of cluster %s: no agent or provider holds it yet", cluster), false
	case lease.Phase == membership.PhaseHeld:
		return fmt.Sprintf("%s holds the bootstrap lease of cluster %s and may bootstrap it", describe(lease.Holder, lease.HolderAddress), cluster), false
	case lease.Phase != membership.PhaseBootstrapping && lease.Phase != membership.PhaseBootstrapped:
		return fmt.Sprintf("the bootstrap lease of cluster %s is in an unknown phase %q: an operator must repair it", cluster, lease.Phase), false
	case len(targets) == 0:
		return "no control-plane Machine list was read in this reconcile", false
	}
	for _, t := range targets {
		if t != lease.HolderAddress {
			return fmt.Sprintf("the bootstrap lease of cluster %s is committed to %s; this reconcile would bootstrap %q",
				cluster, describe(lease.Holder, lease.HolderAddress), t), false
		}
	}
	return "", true
}

// refuse logs a refusal once per change of reason and returns it as the
// error CACPPT sees (and shows in its MachinesBootstrapped condition).
func (g *Gate) refuse(cluster, reason string) error {
	metrics.BootstrapFenceRefusals.Inc()
	if g.refused.changed(cluster, reason) {
		g.Log.Info("bootstrap fence: kept the Talos control-plane provider from the nodes", zap.String("cluster", cluster), zap.String("reason", reason))
	}
	return fmt.Errorf("sovra bootstrap fence: %s", reason)
}
