package membership

import (
	"context"
	"fmt"
	"time"

	"go.uber.org/zap"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/metrics"
)

// The bootstrap lease of a cluster is the coordination.k8s.io/v1 Lease
// "bootstrap-<cluster>" in the service's namespace. Its holder identity is
// the holder's SovraNode name; its phase and the holder's bootstrap address
// are annotations. Every change is a create (create-if-absent) or an update
// carrying the resourceVersion that was read, so of two concurrent callers
// exactly one wins and the other re-reads and is judged on the new state.
//
// The phases and who may move them:
//
//	(none) --Held--> Held(A)            anyone: the first create wins
//	Held(A) --Held--> Held(A)           A renews
//	Held(A), expired --Held--> Held(B)  anyone: A never acted on it
//	Held(A) --Bootstrapping--> Bootstrapping(A)   A, right before Talos Bootstrap
//	Bootstrapping(A) --Bootstrapped--> Bootstrapped(A)   A, once it bootstrapped
//
// A holder commits (Bootstrapping) before it calls Talos Bootstrap, and the
// commit is a compare-and-swap on the lease it holds: if its lease expired
// and another node took it over, the commit fails and it does not bootstrap.
// After the commit the lease never expires and never changes holder, because
// the daemon cannot know whether the holder's Bootstrap call took effect: a
// holder that dies after committing is retried by itself after a reboot (same
// SovraNode, Talos answers AlreadyExists when it did bootstrap), or, when its
// machine is gone, an operator checks etcd and deletes the Lease. Clock skew
// between replicas only changes when a takeover becomes possible, never how
// many nodes bootstrap.
const (
	// leasePrefix prefixes the cluster name in the Lease name.
	leasePrefix = "bootstrap-"
	// AnnotationPhase holds the lease's phase.
	AnnotationPhase = "sovra.dev/bootstrap-phase"
	// AnnotationHolderAddress holds the holder's bootstrap address.
	AnnotationHolderAddress = "sovra.dev/holder-address"
	// maxCASAttempts bounds the read-decide-write rounds of one call.
	maxCASAttempts = 8
)

// Phase is the phase of a bootstrap lease.
type Phase string

// Phases, in order.
const (
	PhaseNone          Phase = ""
	PhaseHeld          Phase = "Held"
	PhaseBootstrapping Phase = "Bootstrapping"
	PhaseBootstrapped  Phase = "Bootstrapped"
	// phaseMissing marks a lease with a holder and no phase annotation
	// (edited by hand): it ranks as unknown, so it is never taken over.
	phaseMissing Phase = "(missing)"
)

// rank orders the phases; an unknown phase ranks highest, so a lease an
// operator damaged is never taken over.
func (p Phase) rank() int {
	switch p {
	case PhaseNone:
		return 0
	case PhaseHeld:
		return 1
	case PhaseBootstrapping:
		return 2
	case PhaseBootstrapped:
		return 3
	}
	return 4
}

// Event reasons of lease decisions.
const (
	ReasonLeaseWon          = "BootstrapLeaseWon"
	ReasonLeaseRenewed      = "BootstrapLeaseRenewed"
	ReasonLeaseHeld         = "BootstrapLeaseHeld"
	ReasonLeaseDenied       = "BootstrapLeaseDenied"
	ReasonBootstrapStarted  = "BootstrapStarted"
	ReasonBootstrapFinished = "Bootstrapped"
)

// LeaseState is a bootstrap lease as the service reads and writes it.
type LeaseState struct {
	// Holder is the holder's SovraNode name; HolderAddress its bootstrap
	// address.
	Holder, HolderAddress string
	Phase                 Phase
	// Acquired is when Holder won it, Renewed when it last renewed or
	// moved it.
	Acquired, Renewed time.Time
	// Duration is how long a Held lease lasts after Renewed.
	Duration time.Duration
	// Transitions counts the changes of holder.
	Transitions int32
}

// Expires is when a Held lease may be taken over.
func (l LeaseState) Expires() time.Time { return l.Renewed.Add(l.Duration) }

// Decision is the answer to a lease call.
type Decision struct {
	// Granted is true when the caller holds the lease in the phase it asked
	// for or a later one.
	Granted bool
	Cluster string
	// Lease is the lease after the call; zero when there is none.
	Lease LeaseState
	// Reason and Message explain the decision (the event's).
	Reason, Message string
}

// zeroLeaseMetrics makes the series of every decision a phase can get
// exist from the start, at zero, so that a dashboard shows "none" and not
// "no data".
func zeroLeaseMetrics() {
	for want, reasons := range map[Phase][]string{
		PhaseHeld:          {ReasonLeaseWon, ReasonLeaseRenewed, ReasonLeaseHeld, ReasonLeaseDenied},
		PhaseBootstrapping: {ReasonBootstrapStarted, ReasonLeaseHeld, ReasonLeaseDenied},
		PhaseBootstrapped:  {ReasonBootstrapFinished, ReasonLeaseHeld, ReasonLeaseDenied},
	} {
		for _, r := range reasons {
			metrics.BootstrapLeaseDecisions.WithLabelValues(string(want), r)
		}
	}
}

// LeaseName is the name of a cluster's bootstrap Lease.
func LeaseName(cluster string) string { return leasePrefix + cluster }

// BootstrapLease moves the caller's cluster's bootstrap lease towards want
// for the caller, whose bootstrap address is address, and returns the
// decision. Every decision is logged and recorded as an event on the
// caller's SovraNode.
func (s *Service) BootstrapLease(ctx context.Context, id Identity, want Phase, address string) (Decision, error) {
	if want != PhaseHeld && want != PhaseBootstrapping && want != PhaseBootstrapped {
		return Decision{}, fmt.Errorf("%w: phase %q: ask for Held, Bootstrapping or Bootstrapped", ErrInvalid, want)
	}
	caller, cluster, err := s.caller(ctx, id)
	if err != nil {
		return Decision{}, err
	}
	if err := checkAddress(caller, address); err != nil {
		return Decision{}, err
	}
	if err := s.ensureNamespace(ctx); err != nil {
		return Decision{}, err
	}
	d, err := s.compareAndSwap(ctx, cluster, caller.Name, address, want)
	if err != nil {
		return Decision{}, err
	}
	d.Cluster = cluster
	s.logDecision(zap.String("node", caller.Name), want, d)
	s.event(ctx, caller, !d.Granted, d.Reason, d.Message)
	return d, nil
}

// compareAndSwap reads the lease, decides, and writes the decision with
// create-if-absent or a resourceVersion-checked update, starting over when
// another writer won in between.
func (s *Service) compareAndSwap(ctx context.Context, cluster, node, address string, want Phase) (Decision, error) {
	for range maxCASAttempts {
		l, err := s.readLease(ctx, cluster)
		if err != nil {
			return Decision{}, err
		}
		var cur *LeaseState
		if l != nil {
			st := fromLease(l)
			cur = &st
		}
		next, d := decide(cur, node, address, want, s.clock.Now(), s.cfg.LeaseDuration)
		if next == nil {
			return d, nil
		}
		if l == nil {
			l = &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{
				Name: LeaseName(cluster), Namespace: s.cfg.Namespace, Labels: map[string]string{LabelCluster: cluster},
			}}
			toLease(*next, l)
			err = s.client.Create(ctx, l)
		} else {
			toLease(*next, l)
			err = s.client.Update(ctx, l)
		}
		switch {
		case err == nil:
			return d, nil
		case apierrors.IsAlreadyExists(err), apierrors.IsConflict(err):
			continue // another writer won: judge again on what it wrote
		default:
			return Decision{}, fmt.Errorf("writing the bootstrap lease of cluster %s: %w", cluster, err)
		}
	}
	return Decision{}, fmt.Errorf("bootstrap lease of cluster %s: %w", cluster, ErrConflict)
}

// decide is the lease's transition function: given the current lease (nil
// when there is none), it returns the lease to write (nil: write nothing)
// and the decision.
func decide(cur *LeaseState, node, address string, want Phase, now time.Time, dur time.Duration) (*LeaseState, Decision) {
	win := func(prev *LeaseState, why string) (*LeaseState, Decision) {
		next := &LeaseState{Holder: node, HolderAddress: address, Phase: PhaseHeld, Acquired: now, Renewed: now, Duration: dur}
		if prev != nil {
			next.Transitions = prev.Transitions + 1
		}
		return next, Decision{Granted: true, Lease: *next, Reason: ReasonLeaseWon, Message: why}
	}
	deny := func(why string) (*LeaseState, Decision) {
		d := Decision{Reason: ReasonLeaseDenied, Message: why}
		if cur != nil {
			d.Lease = *cur
		}
		return nil, d
	}

	switch {
	case cur == nil || cur.Holder == "":
		if want != PhaseHeld {
			return deny(fmt.Sprintf("asked for %s without holding the lease: win it first", want))
		}
		return win(cur, "won the bootstrap lease")

	case cur.Holder == node:
		switch {
		case want.rank() < cur.Phase.rank():
			return nil, Decision{Granted: true, Lease: *cur, Reason: ReasonLeaseHeld, Message: fmt.Sprintf("holds the bootstrap lease, already %s", cur.Phase)}
		case want == PhaseHeld:
			next := *cur
			next.Renewed, next.Duration, next.HolderAddress = now, dur, address
			return &next, Decision{Granted: true, Lease: next, Reason: ReasonLeaseRenewed, Message: "renewed the bootstrap lease"}
		case want == cur.Phase:
			return nil, Decision{Granted: true, Lease: *cur, Reason: ReasonLeaseHeld, Message: fmt.Sprintf("holds the bootstrap lease, %s", cur.Phase)}
		}
		next := *cur
		next.Phase, next.Renewed, next.HolderAddress = want, now, address
		d := Decision{Granted: true, Lease: next, Reason: ReasonBootstrapStarted, Message: "committed to bootstrap etcd at " + address + ": the lease is now permanent"}
		if want == PhaseBootstrapped {
			d.Reason, d.Message = ReasonBootstrapFinished, "bootstrapped etcd at "+address+": the lease is final"
		}
		return &next, d

	case cur.Phase == PhaseHeld && want == PhaseHeld && !now.Before(cur.Expires()):
		return win(cur, fmt.Sprintf("won the bootstrap lease after %s (%s) let it expire unused", cur.Holder, cur.HolderAddress))

	case cur.Phase == PhaseHeld:
		return deny(fmt.Sprintf("%s (%s) holds the bootstrap lease until %s", cur.Holder, cur.HolderAddress, cur.Expires().UTC().Format(time.RFC3339)))
	case cur.Phase == PhaseBootstrapping:
		return deny(fmt.Sprintf("%s (%s) is bootstrapping the cluster", cur.Holder, cur.HolderAddress))
	case cur.Phase == PhaseBootstrapped:
		return deny(fmt.Sprintf("%s (%s) bootstrapped the cluster", cur.Holder, cur.HolderAddress))
	default:
		return deny(fmt.Sprintf("the lease is in an unknown phase %q: an operator must repair or delete it", cur.Phase))
	}
}

// fromLease reads a Lease.
func fromLease(l *coordinationv1.Lease) LeaseState {
	st := LeaseState{Phase: Phase(l.Annotations[AnnotationPhase]), HolderAddress: l.Annotations[AnnotationHolderAddress]}
	if l.Spec.HolderIdentity != nil {
		st.Holder = *l.Spec.HolderIdentity
	}
	if st.Holder != "" && st.Phase == PhaseNone {
		st.Phase = phaseMissing
	}
	if l.Spec.AcquireTime != nil {
		st.Acquired = l.Spec.AcquireTime.Time
	}
	if l.Spec.RenewTime != nil {
		st.Renewed = l.Spec.RenewTime.Time
	}
	if l.Spec.LeaseDurationSeconds != nil {
		st.Duration = time.Duration(*l.Spec.LeaseDurationSeconds) * time.Second
	}
	if l.Spec.LeaseTransitions != nil {
		st.Transitions = *l.Spec.LeaseTransitions
	}
	return st
}

// toLease writes st into l, keeping its metadata.
func toLease(st LeaseState, l *coordinationv1.Lease) {
	if l.Annotations == nil {
		l.Annotations = map[string]string{}
	}
	l.Annotations[AnnotationPhase] = string(st.Phase)
	l.Annotations[AnnotationHolderAddress] = st.HolderAddress
	holder, secs, tr := st.Holder, int32(st.Duration/time.Second), st.Transitions
	acq, ren := metav1.NewMicroTime(st.Acquired), metav1.NewMicroTime(st.Renewed)
	l.Spec = coordinationv1.LeaseSpec{
		HolderIdentity: &holder, LeaseDurationSeconds: &secs,
		AcquireTime: &acq, RenewTime: &ren, LeaseTransitions: &tr,
	}
}

// ensureNamespace creates the lease namespace once (create-if-absent).
func (s *Service) ensureNamespace(ctx context.Context) error {
	s.mu.Lock()
	ready := s.nsReady
	s.mu.Unlock()
	if ready {
		return nil
	}
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: s.cfg.Namespace}}
	if err := s.client.Create(ctx, ns); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating namespace %s for bootstrap leases: %w", s.cfg.Namespace, err)
	}
	s.mu.Lock()
	s.nsReady = true
	s.mu.Unlock()
	return nil
}

// Holder returns the bootstrap lease of a cluster, for the Talos
// control-plane provider's fence: it may bootstrap only the holder, and only
// once the lease is committed. ok is false when there is no lease.
func (s *Service) Holder(ctx context.Context, cluster string) (LeaseState, bool, error) {
	l, err := s.readLease(ctx, cluster)
	if err != nil || l == nil {
		return LeaseState{}, false, err
	}
	return fromLease(l), true, nil
}

// readLease reads a cluster's bootstrap Lease; nil when there is none.
func (s *Service) readLease(ctx context.Context, cluster string) (*coordinationv1.Lease, error) {
	var l coordinationv1.Lease
	err := s.client.Get(ctx, client.ObjectKey{Namespace: s.cfg.Namespace, Name: LeaseName(cluster)}, &l)
	switch {
	case apierrors.IsNotFound(err):
		return nil, nil
	case err != nil:
		return nil, fmt.Errorf("reading the bootstrap lease of cluster %s: %w", cluster, err)
	}
	return &l, nil
}

// logDecision logs and counts a lease decision for caller (a zap field
// naming it).
func (s *Service) logDecision(caller zap.Field, want Phase, d Decision) {
	metrics.BootstrapLeaseDecisions.WithLabelValues(string(want), d.Reason).Inc()
	fields := []zap.Field{
		caller, zap.String("cluster", d.Cluster), zap.String("asked", string(want)),
		zap.String("holder", d.Lease.Holder), zap.String("holder_address", d.Lease.HolderAddress),
		zap.String("phase", string(d.Lease.Phase)), zap.String("reason", d.Reason),
	}
	if d.Granted {
		s.logger.Info("bootstrap lease granted: "+d.Message, fields...)
	} else {
		s.logger.Info("bootstrap lease denied: "+d.Message, fields...)
	}
}

// CommitFor takes a cluster's bootstrap lease for a holder that is not a
// node, the Talos control-plane provider acting for the machine at address,
// and commits it in the same call (Held, then Bootstrapping), so that no
// agent can win it afterwards. The provider may then bootstrap that address
// and nothing else. The decision is logged; the caller records events on its
// own objects.
func (s *Service) CommitFor(ctx context.Context, cluster, holder, address string) (Decision, error) {
	return s.moveFor(ctx, cluster, holder, address, PhaseHeld, PhaseBootstrapping)
}

// FinishFor moves a committed lease of holder (CommitFor) to Bootstrapped.
func (s *Service) FinishFor(ctx context.Context, cluster, holder, address string) (Decision, error) {
	return s.moveFor(ctx, cluster, holder, address, PhaseBootstrapped)
}

// moveFor moves the lease through phases for holder, stopping at the first
// phase that is not granted.
func (s *Service) moveFor(ctx context.Context, cluster, holder, address string, phases ...Phase) (Decision, error) {
	if errs := validation.IsDNS1123Label(cluster); len(errs) > 0 {
		return Decision{}, fmt.Errorf("%w: cluster %q: %s", ErrInvalid, cluster, errs[0])
	}
	if holder == "" {
		return Decision{}, fmt.Errorf("%w: empty holder", ErrInvalid)
	}
	if err := s.ensureNamespace(ctx); err != nil {
		return Decision{}, err
	}
	var d Decision
	for _, want := range phases {
		var err error
		if d, err = s.compareAndSwap(ctx, cluster, holder, address, want); err != nil {
			return Decision{}, err
		}
		d.Cluster = cluster
		s.logDecision(zap.String("caller", holder), want, d)
		if !d.Granted {
			return d, nil
		}
	}
	return d, nil
}

// Enrolled counts the SovraNodes labelled with cluster, attested or not: the
// nodes whose agents may still elect a leader for it.
func (s *Service) Enrolled(ctx context.Context, cluster string) (int, error) {
	var list v1alpha1.SovraNodeList
	if err := s.client.List(ctx, &list, client.MatchingLabels{LabelCluster: cluster}); err != nil {
		return 0, fmt.Errorf("listing the nodes of cluster %s: %w", cluster, err)
	}
	return len(list.Items), nil
}

// Forget deletes a cluster's bootstrap lease if holder still holds it (a
// precondition on the version read, so a lease that changed in between is
// kept), for when the cluster itself is deleted: a cluster created again
// under the same name starts with no lease. It reports whether it deleted.
func (s *Service) Forget(ctx context.Context, cluster, holder string) (bool, error) {
	l, err := s.readLease(ctx, cluster)
	if err != nil || l == nil {
		return false, err
	}
	st := fromLease(l)
	if st.Holder != holder {
		return false, nil
	}
	rv, uid := l.ResourceVersion, l.UID
	err = s.client.Delete(ctx, l, client.Preconditions{ResourceVersion: &rv, UID: &uid})
	switch {
	case apierrors.IsNotFound(err), apierrors.IsConflict(err):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("deleting the bootstrap lease of cluster %s: %w", cluster, err)
	}
	s.logger.Info("bootstrap lease deleted with its cluster", zap.String("cluster", cluster),
		zap.String("holder", st.Holder), zap.String("holder_address", st.HolderAddress), zap.String("phase", string(st.Phase)))
	return true, nil
}
