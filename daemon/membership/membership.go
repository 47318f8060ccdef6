// Package membership answers the cluster calls of the node API: which
// enrolled, attested nodes form the caller's cluster (the peers the agents
// elect a bootstrap leader among), and which one of them holds the right to
// bootstrap the cluster's etcd (the bootstrap lease, see lease.go).
//
// A node's cluster is the label sovra.dev/cluster on its SovraNode, set by an
// operator (kubectl label snode ek-... sovra.dev/cluster=prod) or by the
// infrastructure provider that created the machine for a cluster. It is
// never a value the node asserts: nodes have no access to the Kubernetes API,
// enrollment keeps the labels it does not own, and every call is
// authenticated by the node credential, whose subject is the SovraNode name.
// A node without the label belongs to no cluster: it lists no peers and
// cannot win a lease.
package membership

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/attestation"
)

const (
	// LabelCluster names the cluster a SovraNode belongs to. Its value is a
	// DNS-1123 label (for a Cluster API cluster: the Cluster's name).
	LabelCluster = "sovra.dev/cluster"
	// AnnotationBootstrapAddress is the address the node announced for the
	// election (the Talos API address its agent probes itself at): one of
	// the addresses it enrolled with.
	AnnotationBootstrapAddress = "sovra.dev/bootstrap-address"
	// DefaultNamespace is sovrad's own namespace, which holds the leases.
	DefaultNamespace = "sovra-system"
	// DefaultLeaseDuration is how long a HELD lease lasts without renewal.
	DefaultLeaseDuration = time.Minute
	// eventInterval is the shortest time between two equal events about a
	// node; every decision is still logged.
	eventInterval = 30 * time.Second
	// maxThrottleKeys bounds the event throttle; past it, it starts over.
	maxThrottleKeys = 10000
)

// Sentinel errors; the gRPC edge maps them to status codes.
var (
	// ErrNotEnrolled: the credential names no SovraNode (deleted: revoked).
	ErrNotEnrolled = errors.New("node is not enrolled")
	// ErrNotAttested: the caller's last attestation did not pass, or it is
	// quarantined, or its credential predates its record.
	ErrNotAttested = errors.New("node is not attested")
	// ErrNoCluster: the caller's SovraNode has no valid sovra.dev/cluster label.
	ErrNoCluster = errors.New("node belongs to no cluster")
	// ErrInvalid: the request is malformed.
	ErrInvalid = errors.New("invalid request")
	// ErrConflict: concurrent updates kept winning; the caller may retry.
	ErrConflict = errors.New("conflicting update")
)

// Clock tells the time; tests advance it.
type Clock interface{ Now() time.Time }

type systemClock struct{}

func (systemClock) Now() time.Time { return time.Now() }

// EventRecorder records a decision about a node (attestation.KubeStore).
type EventRecorder interface {
	Event(ctx context.Context, obj runtime.Object, warning bool, reason, message string)
}

// Config configures a Service.
type Config struct {
	// Namespace holds the bootstrap Leases; empty means DefaultNamespace.
	Namespace string
	// LeaseDuration is how long a HELD lease lasts without renewal; zero
	// means DefaultLeaseDuration.
	LeaseDuration time.Duration
}

// Service answers membership and lease calls. It is safe for concurrent
// use; all its state is in the API, except the event throttle.
type Service struct {
	cfg    Config
	client client.Client
	events EventRecorder
	clock  Clock
	logger *zap.Logger

	mu        sync.Mutex // guards nsReady and lastEvent
	nsReady   bool
	lastEvent map[string]time.Time
}

// Scheme returns a scheme with the types the Service reads and writes.
func Scheme() (*runtime.Scheme, error) {
	s, err := attestation.Scheme()
	if err != nil {
		return nil, err
	}
	if err := coordinationv1.AddToScheme(s); err != nil {
		return nil, fmt.Errorf("building scheme: %w", err)
	}
	return s, nil
}

// NewForConfig returns a Service on the API at kubeconfig, speaking JSON.
func NewForConfig(cfg Config, kubeconfig *rest.Config, logger *zap.Logger) (*Service, error) {
	s, err := Scheme()
	if err != nil {
		return nil, err
	}
	kubeconfig = rest.CopyConfig(kubeconfig)
	kubeconfig.ContentType = runtime.ContentTypeJSON
	c, err := client.New(kubeconfig, client.Options{Scheme: s})
	if err != nil {
		return nil, fmt.Errorf("creating API client for membership: %w", err)
	}
	return New(cfg, c, nil, nil, logger), nil
}

// New returns a Service over c. Nil events records core/v1 Events through
// c, a nil clock is the system clock and a nil logger discards.
func New(cfg Config, c client.Client, events EventRecorder, clock Clock, logger *zap.Logger) *Service {
	if cfg.Namespace == "" {
		cfg.Namespace = DefaultNamespace
	}
	if cfg.LeaseDuration <= 0 {
		cfg.LeaseDuration = DefaultLeaseDuration
	}
	if logger == nil {
		logger = zap.NewNop()
	}
	if clock == nil {
		clock = systemClock{}
	}
	if events == nil {
		events = &attestation.KubeStore{Client: c, Logger: logger}
	}
	zeroLeaseMetrics()
	return &Service{cfg: cfg, client: c, events: events, clock: clock, logger: logger}
}

// Identity is who a call comes from, as its verified node credential says
// (package nodeauth authenticated it).
type Identity struct {
	// Node is the SovraNode name (the certificate's common name).
	Node string
	// UID is the record instance the credential was issued to.
	UID types.UID
}

// Member is an attested node of a cluster.
type Member struct {
	Node, Hostname string
	// Address is the announced bootstrap address; empty until announced.
	Address string
	// Addresses are every address the node enrolled with.
	Addresses []string
	// Self marks the caller.
	Self bool
}

// Members returns the attested members of the caller's cluster, sorted by
// name, the caller included. A valid address is recorded as the caller's
// bootstrap address first; it must be one the caller enrolled with.
func (s *Service) Members(ctx context.Context, id Identity, address string) (string, []Member, error) {
	caller, cluster, err := s.caller(ctx, id)
	if err != nil {
		return "", nil, err
	}
	if address != "" {
		if err := s.announce(ctx, caller, address); err != nil {
			return "", nil, err
		}
	}
	var list v1alpha1.SovraNodeList
	if err := s.client.List(ctx, &list, client.MatchingLabels{LabelCluster: cluster}); err != nil {
		return "", nil, fmt.Errorf("listing the nodes of cluster %s: %w", cluster, err)
	}
	var out []Member
	for i := range list.Items {
		n := &list.Items[i]
		if !attested(n) {
			continue
		}
		m := Member{Node: n.Name, Hostname: n.Spec.Hostname, Addresses: slices.Clone(n.Spec.Addresses), Self: n.Name == caller.Name}
		if a := n.Annotations[AnnotationBootstrapAddress]; slices.Contains(n.Spec.Addresses, a) {
			m.Address = a
		}
		out = append(out, m)
	}
	slices.SortFunc(out, func(a, b Member) int { return strings.Compare(a.Node, b.Node) })
	s.logger.Debug("membership listed", zap.String("node", caller.Name), zap.String("cluster", cluster), zap.Int("members", len(out)))
	return cluster, out, nil
}

// announce records address as the caller's bootstrap address when it is
// one the caller enrolled with and differs from the recorded one.
func (s *Service) announce(ctx context.Context, n *v1alpha1.SovraNode, address string) error {
	if err := checkAddress(n, address); err != nil {
		return err
	}
	if n.Annotations[AnnotationBootstrapAddress] == address {
		return nil
	}
	patch := fmt.Appendf(nil, `{"metadata":{"annotations":{%q:%q}}}`, AnnotationBootstrapAddress, address)
	if err := s.client.Patch(ctx, n, client.RawPatch(types.MergePatchType, patch)); err != nil {
		return fmt.Errorf("recording the bootstrap address of node %s: %w", n.Name, err)
	}
	s.logger.Info("node announced its bootstrap address", zap.String("node", n.Name), zap.String("address", address))
	return nil
}

// checkAddress accepts only an IP address the node enrolled with.
func checkAddress(n *v1alpha1.SovraNode, address string) error {
	a, err := netip.ParseAddr(address)
	if err != nil {
		return fmt.Errorf("%w: address %q is not an IP address", ErrInvalid, address)
	}
	if !slices.Contains(n.Spec.Addresses, a.String()) {
		return fmt.Errorf("%w: address %s is not one node %s enrolled with (%v); re-enroll from it", ErrInvalid, a, n.Name, n.Spec.Addresses)
	}
	return nil
}

// caller returns the caller's record and cluster, refusing a revoked,
// unattested, quarantined or clusterless node, and a credential issued to
// an earlier instance of the record (deleted and enrolled again).
func (s *Service) caller(ctx context.Context, id Identity) (*v1alpha1.SovraNode, string, error) {
	var n v1alpha1.SovraNode
	if err := s.client.Get(ctx, client.ObjectKey{Name: id.Node}, &n); err != nil {
		if apierrors.IsNotFound(err) {
			return nil, "", fmt.Errorf("node %s: %w", id.Node, ErrNotEnrolled)
		}
		return nil, "", fmt.Errorf("reading node %s: %w", id.Node, err)
	}
	if n.UID != id.UID {
		return nil, "", fmt.Errorf("node %s: %w: the credential was issued to an earlier instance of the record; attest again", id.Node, ErrNotAttested)
	}
	if !attested(&n) {
		return nil, "", fmt.Errorf("node %s: %w: its last attestation did not pass or it is quarantined; attest again", id.Node, ErrNotAttested)
	}
	cluster, err := clusterOf(&n)
	if err != nil {
		return nil, "", err
	}
	return &n, cluster, nil
}

// clusterOf returns the node's cluster label.
func clusterOf(n *v1alpha1.SovraNode) (string, error) {
	c, ok := n.Labels[LabelCluster]
	if !ok || c == "" {
		return "", fmt.Errorf("node %s: %w: label it with kubectl label snode %s %s=<cluster>", n.Name, ErrNoCluster, n.Name, LabelCluster)
	}
	if errs := validation.IsDNS1123Label(c); len(errs) > 0 {
		return "", fmt.Errorf("node %s: %w: label %s=%q is not a DNS-1123 label: %s", n.Name, ErrNoCluster, LabelCluster, c, errs[0])
	}
	return c, nil
}

// attested reports whether the node's last attestation passed and it is not
// quarantined.
func attested(n *v1alpha1.SovraNode) bool {
	return n.Status.LastAttestationResult == v1alpha1.ResultPassed && !n.Quarantined()
}

// event logs nothing (the caller logs) and records an event about node,
// throttled per node, reason and message.
func (s *Service) event(ctx context.Context, n *v1alpha1.SovraNode, warning bool, reason, message string) {
	now := s.clock.Now()
	key := n.Name + "/" + reason + "/" + message
	s.mu.Lock()
	if s.lastEvent == nil || len(s.lastEvent) >= maxThrottleKeys {
		s.lastEvent = map[string]time.Time{}
	}
	prev, seen := s.lastEvent[key]
	allow := !seen || now.Sub(prev) >= eventInterval
	if allow {
		s.lastEvent[key] = now
	}
	s.mu.Unlock()
	if allow {
		s.events.Event(ctx, n, warning, reason, message)
	}
}
