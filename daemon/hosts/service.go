package hosts

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/retry"
	clusterv1 "sigs.k8s.io/cluster-api/api/v1beta1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	controlplanev1 "github.com/siderolabs/cluster-api-control-plane-provider-talos/api/v1alpha3"
	"github.com/siderolabs/crypto/x509"
	"github.com/siderolabs/talos/pkg/machinery/config/configloader"
	"github.com/siderolabs/talos/pkg/machinery/config/generate/secrets"
	"github.com/siderolabs/talos/pkg/machinery/config/machine"
	"go.yaml.in/yaml/v4"

	infrav1 "github.com/sovra-dev/sovra/daemon/apis/infrastructure/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/machineconfig"
	"github.com/sovra-dev/sovra/daemon/metrics"
	"github.com/sovra-dev/sovra/daemon/nodeauth"
	"github.com/sovra-dev/sovra/internal/hostapi"
)

// Clock tells the time; tests advance it.
type Clock interface{ Now() time.Time }

type systemClock struct{}

func (systemClock) Now() time.Time { return time.Now() }

// Service is the metadata service: the HostService the agents of the pool
// call. Create it with New and register it on the node API.
type Service struct {
	hostapi.UnimplementedHostServiceServer

	cfg    Config
	client client.Client
	events record.EventRecorder
	clock  Clock
	logger *zap.Logger
}

// New returns the metadata service over c (whose scheme knows sovra's,
// the infrastructure provider's and Cluster API's types). A nil clock is
// the system clock; a nil logger discards.
func New(cfg Config, c client.Client, events record.EventRecorder, clock Clock, logger *zap.Logger) (*Service, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if clock == nil {
		clock = systemClock{}
	}
	if logger == nil {
		logger = zap.NewNop()
	}
	return &Service{cfg: cfg.withDefaults(), client: c, events: events, clock: clock, logger: logger}, nil
}

// Register adds the HostService to a gRPC server whose interceptors
// authenticate node credentials (the node API).
func (s *Service) Register(g grpc.ServiceRegistrar) { hostapi.RegisterHostServiceServer(g, s) }

// decision is what Sync answers, and what it records.
type decision struct {
	action  hostapi.Action
	config  []byte
	gen     int64
	message string
}

func wait(format string, a ...any) decision {
	return decision{action: hostapi.Action_ACTION_WAIT, message: fmt.Sprintf(format, a...)}
}

// Sync implements hostapi.HostServiceServer.
func (s *Service) Sync(ctx context.Context, req *hostapi.SyncRequest) (*hostapi.SyncResponse, error) {
	id, err := nodeauth.Require(ctx)
	if err != nil {
		return nil, err
	}
	rec := id.Record
	if !id.CurrentBoot() {
		s.logger.Warn("host sync refused: the credential is not of the node's current boot", zap.String("host", rec.Name), zap.String("boot", id.Boot))
		return nil, status.Error(codes.PermissionDenied, "the node credential is not of this boot's attestation: attest again")
	}
	mode := ModeEnrollment
	if req.GetMode() == hostapi.Mode_MODE_CONFIGURED {
		mode = ModeConfigured
	}
	// The host reconciler writes the same host (a new host's first status,
	// for one): a write that lost the race is done again on a fresh read.
	var d decision
	err = retry.RetryOnConflict(retry.DefaultBackoff, func() error {
		host, err := s.ensureHost(ctx, rec, req)
		if err != nil {
			return err
		}
		d, err = s.decide(ctx, host, rec, id.Boot, mode, req.GetGeneration(), req.GetHardware())
		return err
	})
	if err != nil {
		return nil, s.unavailable(rec.Name, err)
	}
	retry := waitRetry
	if d.action == hostapi.Action_ACTION_NONE {
		retry = steadyRetry
	}
	return &hostapi.SyncResponse{Action: d.action, Config: d.config, Generation: d.gen, Message: d.message, RetrySeconds: int64(retry / time.Second)}, nil
}

func (s *Service) unavailable(host string, err error) error {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return status.Error(codes.DeadlineExceeded, "host sync timed out; retry")
	}
	s.logger.Error("host sync failed", zap.String("host", host), zap.Error(err))
	return status.Error(codes.Unavailable, "the daemon could not complete the host sync; retry later")
}

// ensureHost returns the host of rec, creating it on its first Sync, with
// its labels from the reported hardware.
func (s *Service) ensureHost(ctx context.Context, rec *v1alpha1.SovraNode, req *hostapi.SyncRequest) (*v1alpha1.Host, error) {
	var host v1alpha1.Host
	err := s.client.Get(ctx, client.ObjectKey{Name: rec.Name}, &host)
	switch {
	case apierrors.IsNotFound(err):
		host = v1alpha1.Host{ObjectMeta: metav1.ObjectMeta{
			Name: rec.Name, Labels: hardwareLabels(req.GetHardware()),
			OwnerReferences: []metav1.OwnerReference{{APIVersion: v1alpha1.GroupVersion.String(), Kind: "SovraNode", Name: rec.Name, UID: rec.UID}},
		}, Spec: v1alpha1.HostSpec{Accepted: s.cfg.AutoAccept && autoAcceptable(rec)}}
		if err := s.client.Create(ctx, &host); err != nil && !apierrors.IsAlreadyExists(err) {
			return nil, fmt.Errorf("creating host %s: %w", rec.Name, err)
		}
		if err := s.client.Get(ctx, client.ObjectKey{Name: rec.Name}, &host); err != nil {
			return nil, fmt.Errorf("reading host %s: %w", rec.Name, err)
		}
		s.logger.Info("new host in the pool", zap.String("host", rec.Name), zap.String("uuid", rec.Spec.UUID), zap.Bool("accepted", host.Spec.Accepted))
		s.event(&host, corev1.EventTypeNormal, "HostEnrolled", "the machine booted the enrollment configuration, enrolled and attested"+acceptedNote(host.Spec.Accepted))
	case err != nil:
		return nil, fmt.Errorf("reading host %s: %w", rec.Name, err)
	}
	labels := hardwareLabels(req.GetHardware())
	if len(labels) > 0 && !subset(labels, host.Labels) {
		if host.Labels == nil {
			host.Labels = map[string]string{}
		}
		maps.Copy(host.Labels, labels)
		if err := s.client.Update(ctx, &host); err != nil {
			return nil, fmt.Errorf("labelling host %s: %w", rec.Name, err)
		}
	}
	return &host, nil
}

func acceptedNote(accepted bool) string {
	if accepted {
		return "; accepted by policy (--hosts-auto-accept)"
	}
	return "; accept it with: kubectl patch host NAME --type merge -p '{\"spec\":{\"accepted\":true}}'"
}

func subset(a, b map[string]string) bool {
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// autoAcceptable: the EK was admitted by a certificate or the allow-list,
// and the last attestation passed at least one policy.
func autoAcceptable(rec *v1alpha1.SovraNode) bool {
	return rec.Status.EnrollmentMethod != "" && rec.Status.EnrollmentMethod != "TrustOnFirstUse" &&
		rec.AttestedOK() && len(rec.Status.Policies) > 0
}

// decide works out what the host does next, records it in the host's
// status (before anything leaves) with the hardware the host reported, and
// returns it.
func (s *Service) decide(ctx context.Context, host *v1alpha1.Host, rec *v1alpha1.SovraNode, boot, mode string, running int64, hw *hostapi.Hardware) (decision, error) {
	now := s.clock.Now()
	st := host.Status.DeepCopy()
	st.UUID, st.Addresses, st.Mode, st.Boot = rec.Spec.UUID, slices.Clone(rec.Spec.Addresses), mode, boot
	if hw != nil {
		st.Hardware = hardwareStatus(hw)
	}
	if mode == ModeConfigured {
		st.RunningGeneration = running
	}
	setAttested(st, rec, now)
	var d decision
	switch {
	case host.Spec.ConsumerRef == nil:
		d = s.unclaimed(host, st, mode, now)
	default:
		var err error
		if d, err = s.claimed(ctx, host, st, rec, mode, running, now); err != nil {
			return decision{}, err
		}
	}
	if err := s.writeStatus(ctx, host, st, now); err != nil {
		return decision{}, err
	}
	if d.action == hostapi.Action_ACTION_APPLY {
		s.logger.Info("configuration released", zap.String("host", host.Name), zap.String("machine", st.Machine),
			zap.Int64("generation", d.gen), zap.String("boot", boot))
		s.event(host, corev1.EventTypeNormal, ReasonConfigReleased, fmt.Sprintf("configuration generation %d of machine %s released to boot %s", d.gen, st.Machine, boot))
		metrics.ConfigReleases.WithLabelValues("released", ReasonConfigReleased).Inc()
	}
	return d, nil
}

// unclaimed handles a host no machine holds.
func (s *Service) unclaimed(host *v1alpha1.Host, st *v1alpha1.HostStatus, mode string, now time.Time) decision {
	switch {
	case st.Phase == v1alpha1.HostReleasing && mode == ModeEnrollment && st.ReleaseRequested != nil && st.Boot != st.ReleaseBoot:
		// It wiped itself and booted the enrollment configuration again.
		st.Phase, st.Cluster, st.Machine = pooled(host), "", ""
		st.ReleasedGeneration, st.RunningGeneration, st.ConfigHash, st.ReleaseRequested, st.ReleaseBoot = 0, 0, "", nil, ""
		st.TalosActor, st.DaemonAction = "", nil
		meta.SetStatusCondition(&st.Conditions, metav1.Condition{Type: v1alpha1.HostConditionReset, Status: metav1.ConditionFalse,
			Reason: ReasonHostReturned, Message: "the host was wiped and attested on the enrollment configuration", LastTransitionTime: metav1.NewTime(now)})
		s.logger.Info("host returned to the pool", zap.String("host", host.Name))
		s.event(host, corev1.EventTypeNormal, ReasonHostReturned, "the host was wiped, booted the enrollment configuration and attested: back in the pool")
		return wait("back in the pool")
	case st.Phase == v1alpha1.HostReleasing, mode == ModeConfigured:
		// Released, or running a configuration nobody holds: wipe it.
		if st.Phase != v1alpha1.HostReleasing {
			st.Phase, st.ReleaseRequested, st.ReleaseBoot = v1alpha1.HostReleasing, &metav1.Time{Time: now}, st.Boot
		}
		if daemonResets(st) {
			// A configured worker's agent cannot reset it (os:reader):
			// sovrad's host reconciler does (daemonaction.go).
			requestReset(st, now)
			meta.SetStatusCondition(&st.Conditions, metav1.Condition{Type: v1alpha1.HostConditionReset, Status: metav1.ConditionTrue,
				Reason: ReasonHostReleased, Message: "sovrad wipes STATE and EPHEMERAL through the host's Talos API", LastTransitionTime: metav1.NewTime(now)})
			return wait("released: sovrad resets this machine through its Talos API (wipes STATE and EPHEMERAL, reboots into the enrollment configuration)")
		}
		meta.SetStatusCondition(&st.Conditions, metav1.Condition{Type: v1alpha1.HostConditionReset, Status: metav1.ConditionTrue,
			Reason: ReasonHostReleased, Message: "wiping STATE and EPHEMERAL", LastTransitionTime: metav1.NewTime(now)})
		return decision{action: hostapi.Action_ACTION_RESET, message: "released: wipe STATE and EPHEMERAL and reboot into the enrollment configuration"}
	case st.Phase == v1alpha1.HostFailed:
		return wait("the host's attestation failed: it is out of the pool until an operator accepts it again")
	}
	st.Phase = pooled(host)
	if st.Phase == v1alpha1.HostPending {
		return wait("waiting to be accepted")
	}
	return wait("available: waiting to be claimed")
}

// pooled is the phase of an unclaimed host in the pool.
func pooled(host *v1alpha1.Host) v1alpha1.HostPhase {
	if host.Spec.Accepted {
		return v1alpha1.HostAvailable
	}
	return v1alpha1.HostPending
}

// claimed handles a host a machine holds: it releases the machine's
// configuration, once, to a recent passing attestation of this boot, while
// the host is accepted.
func (s *Service) claimed(ctx context.Context, host *v1alpha1.Host, st *v1alpha1.HostStatus, rec *v1alpha1.SovraNode, mode string, running int64, now time.Time) (decision, error) {
	ref := host.Spec.ConsumerRef
	st.Machine = ref.Namespace + "/" + ref.Name
	if !host.Spec.Accepted {
		// Only an accepted host is claimed; the reconciler withdraws the
		// acceptance when its attestation fails (or its node is
		// quarantined), and it stays withdrawn after the node attests again:
		// nothing is released until an operator accepts the host again.
		s.refuse(host, reasonNotAccepted, "host %s is not accepted (its attestation failed since it was claimed): no configuration until an operator accepts it again", host.Name)
		return wait("not accepted: a configuration is released only to an accepted host"), nil
	}
	if st.Phase == v1alpha1.HostPending || st.Phase == v1alpha1.HostAvailable || st.Phase == "" {
		st.Phase = v1alpha1.HostClaimed
	}
	bootstrap, cluster, m, err := bootstrapData(ctx, s.client, ref)
	st.Cluster = cluster
	if errors.Is(err, ErrNotReady) {
		return wait("claimed by %s: %v", st.Machine, err), nil
	}
	if err != nil {
		return decision{}, err
	}
	hash := bootstrapHash(bootstrap)
	if hash != st.ConfigHash {
		st.ConfigHash = hash
		st.ReleasedGeneration++ // a new generation: released to the next Sync that may have it
		st.Phase = v1alpha1.HostProvisioning
	}
	if mode == ModeConfigured && running == st.ReleasedGeneration {
		st.Phase = v1alpha1.HostProvisioned
		if a := st.DaemonAction; a != nil && a.Type == v1alpha1.DaemonActionApply && a.Generation <= running {
			st.DaemonAction = nil // applied: the host runs it
		}
		return decision{action: hostapi.Action_ACTION_NONE, message: "running generation " + fmt.Sprint(running)}, nil
	}
	if reason, why := attestationRefusal(rec, now, s.cfg.MaxAttestationAge); reason != "" {
		s.refuse(host, reason, "%s", why)
		return wait("%s", why), nil
	}
	merged, worker, err := releasedConfig(ctx, s.client, s.cfg.Daemon, host, release{
		namespace: ref.Namespace, cluster: cluster, machine: m, addresses: st.Addresses, bootstrap: bootstrap, generation: st.ReleasedGeneration,
	}, now)
	if errors.Is(err, errConfigInvalid) {
		s.refuse(host, reasonConfigInvalid, "the machine's configuration does not merge: %v", err)
		return wait("the machine's configuration is not valid; see the host's events"), nil
	}
	if err != nil {
		return decision{}, err
	}
	st.Phase = v1alpha1.HostProvisioning
	st.TalosActor = v1alpha1.TalosActorAgent
	if worker {
		st.TalosActor = v1alpha1.TalosActorDaemon
	}
	if worker && mode == ModeConfigured {
		// A configured worker's agent holds an os:reader certificate:
		// sovrad's host reconciler applies the new generation with the
		// cluster's talosconfig (daemonaction.go).
		if a := st.DaemonAction; a == nil || a.Type != v1alpha1.DaemonActionApply || a.Generation != st.ReleasedGeneration || a.Boot != st.Boot {
			st.DaemonAction = &v1alpha1.HostDaemonAction{Type: v1alpha1.DaemonActionApply, Generation: st.ReleasedGeneration, Boot: st.Boot, Requested: metav1.NewTime(now)}
			s.logger.Info("configuration released to sovrad: it applies it through the worker's Talos API", zap.String("host", host.Name),
				zap.String("machine", st.Machine), zap.Int64("generation", st.ReleasedGeneration), zap.String("boot", st.Boot))
			s.event(host, corev1.EventTypeNormal, ReasonConfigReleased, fmt.Sprintf("configuration generation %d of machine %s released to sovrad, which applies it through the worker's Talos API (boot %s)", st.ReleasedGeneration, st.Machine, st.Boot))
			metrics.ConfigReleases.WithLabelValues("released", ReasonConfigReleased).Inc()
		}
		meta.SetStatusCondition(&st.Conditions, metav1.Condition{Type: v1alpha1.HostConditionConfigReleased, Status: metav1.ConditionTrue,
			Reason: ReasonConfigReleased, Message: fmt.Sprintf("generation %d released to sovrad, which applies it through the host's Talos API", st.ReleasedGeneration), LastTransitionTime: metav1.NewTime(now)})
		return wait("sovrad applies generation %d of %s through this machine's Talos API", st.ReleasedGeneration, st.Machine), nil
	}
	meta.SetStatusCondition(&st.Conditions, metav1.Condition{Type: v1alpha1.HostConditionConfigReleased, Status: metav1.ConditionTrue,
		Reason: ReasonConfigReleased, Message: fmt.Sprintf("generation %d released to boot %s", st.ReleasedGeneration, st.Boot), LastTransitionTime: metav1.NewTime(now)})
	return decision{action: hostapi.Action_ACTION_APPLY, config: merged, gen: st.ReleasedGeneration, message: "apply the configuration of " + st.Machine}, nil
}

// refuse audits a configuration that was not released.
func (s *Service) refuse(host *v1alpha1.Host, reason, format string, a ...any) {
	msg := fmt.Sprintf(format, a...)
	metrics.ConfigReleases.WithLabelValues("refused", reason).Inc()
	s.logger.Warn("configuration not released", zap.String("host", host.Name), zap.String("reason", msg))
	s.event(host, corev1.EventTypeWarning, ReasonConfigRefused, msg)
}

// bootstrapData follows a claim to its Machine's bootstrap data: the
// SovraMachine, the Machine that owns it, the Secret it names.
func bootstrapData(ctx context.Context, c client.Reader, ref *corev1.ObjectReference) ([]byte, string, *clusterv1.Machine, error) {
	var sm infrav1.SovraMachine
	if err := c.Get(ctx, client.ObjectKey{Namespace: ref.Namespace, Name: ref.Name}, &sm); err != nil {
		if apierrors.IsNotFound(err) {
			return nil, "", nil, fmt.Errorf("%w: machine %s/%s is gone", ErrNotReady, ref.Namespace, ref.Name)
		}
		return nil, "", nil, fmt.Errorf("reading machine %s/%s: %w", ref.Namespace, ref.Name, err)
	}
	if sm.UID != ref.UID {
		return nil, "", nil, fmt.Errorf("%w: machine %s/%s was re-created", ErrNotReady, ref.Namespace, ref.Name)
	}
	cluster := sm.Labels[clusterv1.ClusterNameLabel]
	var owner string
	for _, o := range sm.OwnerReferences {
		if o.Kind == "Machine" {
			owner = o.Name
		}
	}
	if owner == "" {
		return nil, cluster, nil, fmt.Errorf("%w: no Machine owns %s/%s yet", ErrNotReady, ref.Namespace, ref.Name)
	}
	var m clusterv1.Machine
	if err := c.Get(ctx, client.ObjectKey{Namespace: ref.Namespace, Name: owner}, &m); err != nil {
		return nil, cluster, nil, fmt.Errorf("reading Machine %s/%s: %w", ref.Namespace, owner, err)
	}
	if m.Spec.Bootstrap.DataSecretName == nil {
		return nil, cluster, nil, fmt.Errorf("%w: waiting for the bootstrap data of Machine %s", ErrNotReady, owner)
	}
	var sec corev1.Secret
	if err := c.Get(ctx, client.ObjectKey{Namespace: ref.Namespace, Name: *m.Spec.Bootstrap.DataSecretName}, &sec); err != nil {
		return nil, cluster, nil, fmt.Errorf("reading the bootstrap data of Machine %s: %w", owner, err)
	}
	data := sec.Data["value"]
	if len(data) == 0 {
		return nil, cluster, nil, fmt.Errorf("%w: the bootstrap data of Machine %s is empty", ErrNotReady, owner)
	}
	return data, cluster, &m, nil
}

// errConfigInvalid marks a bootstrap data that does not merge.
var errConfigInvalid = errors.New("invalid configuration")

// release is what a configuration is released from: the claim's
// namespace and cluster, its Machine and bootstrap data, the host's
// addresses, the generation.
type release struct {
	namespace, cluster string
	machine            *clusterv1.Machine
	addresses          []string
	bootstrap          []byte
	generation         int64
}

// releasedConfig is the configuration of rel's generation released to host:
// its Machine's bootstrap data merged with what sovra needs on the node.
// worker reports a worker's configuration, whose agent gets an os:reader
// certificate of the cluster's Talos CA (agentCAFor). The agent is told its
// role and its address (the host's first, as its Machine's), and a control
// plane's agent how many control planes its election expects.
func releasedConfig(ctx context.Context, c client.Client, d machineconfig.Daemon, host *v1alpha1.Host, rel release, now time.Time) (merged []byte, worker bool, err error) {
	ca, worker, err := agentCAFor(ctx, c, host, rel.namespace, rel.cluster, rel.bootstrap, now)
	if err != nil {
		return nil, false, err
	}
	r := machineconfig.Released{
		Daemon: d, ProviderID: ProviderID(host.Name), Generation: rel.generation, AgentCA: ca, AgentReadOnly: worker,
		Role: machineconfig.RoleWorker,
	}
	if len(rel.addresses) > 0 {
		r.NodeAddress = rel.addresses[0]
	}
	if !worker {
		r.Role = machineconfig.RoleControlPlane
		if r.ExpectedControlPlanes, err = controlPlaneReplicas(ctx, c, rel.machine); err != nil {
			return nil, false, err
		}
	}
	merged, err = machineconfig.Merge(rel.bootstrap, r)
	if err != nil {
		return nil, worker, fmt.Errorf("%w: %w", errConfigInvalid, err)
	}
	return merged, worker, nil
}

// controlPlaneReplicas is the size of the control plane m belongs to: the
// replicas of the TalosControlPlane that owns it; zero when none does (a
// control-plane Machine of another provider: the agent's default).
func controlPlaneReplicas(ctx context.Context, c client.Reader, m *clusterv1.Machine) (int32, error) {
	if m == nil {
		return 0, nil
	}
	for _, o := range m.OwnerReferences {
		gv, err := schema.ParseGroupVersion(o.APIVersion)
		if err != nil || o.Kind != talosControlPlaneKind || gv.Group != controlplanev1.GroupVersion.Group {
			continue
		}
		var tcp controlplanev1.TalosControlPlane
		if err := c.Get(ctx, client.ObjectKey{Namespace: m.Namespace, Name: o.Name}, &tcp); err != nil {
			return 0, fmt.Errorf("reading the control plane %s/%s of Machine %s: %w", m.Namespace, o.Name, m.Name, err)
		}
		if tcp.Spec.Replicas == nil {
			return 1, nil // the CRD's default
		}
		return *tcp.Spec.Replicas, nil
	}
	return 0, nil
}

// agentCAFor returns the CA that signs the agent's client certificate for
// its machine's Talos API, and whether that certificate must be read-only.
// A control-plane node's apid accepts machine.acceptedCAs, so that is the
// host's own agent CA, and the certificate is os:admin on this host alone.
// A worker's apid accepts only the CA trustd returned with its certificate,
// the cluster's Talos CA (Talos's secrets/api.go, generateWorker), so a
// worker's agent gets a certificate of that CA, from the secrets bundle the
// Talos bootstrap provider keeps for the cluster; valid on every node of
// the cluster, it is os:reader (worker is true), and what needs os:admin on
// the worker sovrad does (daemonaction.go).
func agentCAFor(ctx context.Context, c client.Client, host *v1alpha1.Host, ns, cluster string, bootstrap []byte, now time.Time) (*x509.PEMEncodedCertificateAndKey, bool, error) {
	cfg, err := configloader.NewFromBytes(bootstrap)
	if err != nil || cfg.Machine() == nil || cfg.Machine().Type() != machine.TypeWorker {
		ca, err := agentCA(ctx, c, host, now) // Merge reports a bootstrap data that does not load
		return ca, false, err
	}
	var sec corev1.Secret
	if err := c.Get(ctx, client.ObjectKey{Namespace: ns, Name: cluster + clusterSecretsSuffix}, &sec); err != nil {
		return nil, true, fmt.Errorf("reading the Talos secrets of cluster %s/%s: %w", ns, cluster, err)
	}
	var bundle secrets.Bundle
	if err := yaml.Unmarshal(sec.Data[clusterSecretsKey], &bundle); err != nil || bundle.Certs == nil || bundle.Certs.OS == nil {
		return nil, true, fmt.Errorf("reading the Talos secrets of cluster %s/%s: no Talos CA in them", ns, cluster)
	}
	return bundle.Certs.OS, true, nil
}

// agentCA returns the CA of the host's agent client certificates, making it
// on the first release; a Secret the host owns.
func agentCA(ctx context.Context, c client.Client, host *v1alpha1.Host, now time.Time) (*x509.PEMEncodedCertificateAndKey, error) {
	name := agentCASecretPrefix + host.Name
	var sec corev1.Secret
	err := c.Get(ctx, client.ObjectKey{Namespace: Namespace, Name: name}, &sec)
	if apierrors.IsNotFound(err) {
		ca, err := machineconfig.NewAgentCA(now)
		if err != nil {
			return nil, err
		}
		sec = corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: Namespace, Name: name,
			OwnerReferences: []metav1.OwnerReference{{APIVersion: v1alpha1.GroupVersion.String(), Kind: "Host", Name: host.Name, UID: host.UID}}},
			Type: corev1.SecretTypeTLS, Data: map[string][]byte{corev1.TLSCertKey: ca.Crt, corev1.TLSPrivateKeyKey: ca.Key}}
		if err := c.Create(ctx, &sec); err != nil && !apierrors.IsAlreadyExists(err) {
			return nil, fmt.Errorf("storing the agent CA of host %s: %w", host.Name, err)
		}
		if err := c.Get(ctx, client.ObjectKey{Namespace: Namespace, Name: name}, &sec); err != nil {
			return nil, fmt.Errorf("reading the agent CA of host %s: %w", host.Name, err)
		}
	} else if err != nil {
		return nil, fmt.Errorf("reading the agent CA of host %s: %w", host.Name, err)
	}
	return &x509.PEMEncodedCertificateAndKey{Crt: sec.Data[corev1.TLSCertKey], Key: sec.Data[corev1.TLSPrivateKeyKey]}, nil
}

// writeStatus writes st when it differs from the host's (or its last sync
// is old), with the host's resourceVersion: a concurrent change makes the
// agent sync again.
func (s *Service) writeStatus(ctx context.Context, host *v1alpha1.Host, st *v1alpha1.HostStatus, now time.Time) error {
	last := host.Status.LastSync
	stale := last == nil || now.Sub(last.Time) >= syncWriteEvery
	st.LastSync = last
	if !stale && equalStatus(&host.Status, st) {
		return nil
	}
	st.LastSync = &metav1.Time{Time: now}
	host.Status = *st
	if err := s.client.Status().Update(ctx, host); err != nil {
		return fmt.Errorf("recording the state of host %s: %w", host.Name, err)
	}
	return nil
}

func equalStatus(a, b *v1alpha1.HostStatus) bool {
	x, y := a.DeepCopy(), b.DeepCopy()
	x.LastSync, y.LastSync = nil, nil
	for _, c := range [][]metav1.Condition{x.Conditions, y.Conditions} {
		for i := range c {
			c[i].LastTransitionTime = metav1.Time{}
		}
	}
	return equality.Semantic.DeepEqual(x, y)
}

func (s *Service) event(host *v1alpha1.Host, typ, reason, msg string) {
	if s.events != nil {
		s.events.Event(host, typ, reason, msg)
	}
}

// setAttested mirrors the node's attestation on the host.
func setAttested(st *v1alpha1.HostStatus, rec *v1alpha1.SovraNode, now time.Time) {
	c := metav1.Condition{Type: v1alpha1.HostConditionAttested, Status: metav1.ConditionFalse, Reason: rec.Status.Reason,
		Message: "last attestation: " + rec.Status.LastAttestationResult, LastTransitionTime: metav1.NewTime(now)}
	if rec.AttestedOK() {
		c.Status = metav1.ConditionTrue
	}
	if c.Reason == "" {
		c.Reason = "Unknown"
	}
	meta.SetStatusCondition(&st.Conditions, c)
}
