package kms

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/selection"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/rest"
	toolscache "k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/attestation"
)

const (
	// uuidIndex indexes SovraNodes by their lower-cased spec.uuid.
	uuidIndex = "kms.sovra.dev/uuid"
	// clientQPS and clientBurst let the KMS's writes keep up with a boot
	// storm; the API server bounds them too.
	clientQPS   = 500
	clientBurst = 1000
	// eventSource names the KMS in the events of its decisions and alarms;
	// refusalSource in the events of refused calls, so that a flood of
	// refusals, whose events the recorder throttles per node, never
	// silences an alarm.
	eventSource   = "sovrad-kms"
	refusalSource = "sovrad-kms-refusals"
)

// Sentinel errors of the store.
var (
	errNotFound = errors.New("node record not found")
	errConflict = errors.New("node record changed concurrently")
	errExists   = errors.New("node record already exists")
)

// Store is what the KMS reads and writes: a cache of node records, UUID
// claims and ledgers for the hot path and the API for everything that must
// be exact.
type Store interface {
	// ByUUID returns the cached records naming uuid (lower case). Cached
	// objects are shared: callers must not modify them.
	ByUUID(uuid string) []*v1alpha1.SovraNode
	// List returns every cached record.
	List() []*v1alpha1.SovraNode
	// Node returns the cached record name, nil when there is none.
	Node(name string) *v1alpha1.SovraNode
	// Claim returns the cached claim of uuid, nil when there is none.
	Claim(uuid string) *v1alpha1.UUIDClaim
	// Ledgers returns the cached ledger segments of the other replicas
	// (this replica's own entries are in memory, and newer).
	Ledgers() []*v1alpha1.UnsealLedger

	// Get reads a record from the API, not the cache.
	Get(ctx context.Context, name string) (*v1alpha1.SovraNode, error)
	// Create creates a record (spec, labels and annotations), then its status.
	Create(ctx context.Context, n *v1alpha1.SovraNode) error
	// Update writes n's metadata and spec if n's resourceVersion is current.
	Update(ctx context.Context, n *v1alpha1.SovraNode) error
	// UpdateStatus writes n's status if n's resourceVersion is current.
	UpdateStatus(ctx context.Context, n *v1alpha1.SovraNode) error
	// Annotate merges annotations into a record; nil values remove keys.
	Annotate(ctx context.Context, name string, set map[string]*string) error
	// Delete removes exactly this record (by UID).
	Delete(ctx context.Context, n *v1alpha1.SovraNode) error
	// CreateClaim creates a UUID claim, or returns errExists.
	CreateClaim(ctx context.Context, c *v1alpha1.UUIDClaim) error
	// UpdateClaim writes c if its resourceVersion is current, or errConflict.
	UpdateClaim(ctx context.Context, c *v1alpha1.UUIDClaim) error

	// OwnLedgers lists, from the API, the segments of replica.
	OwnLedgers(ctx context.Context, replica string) ([]v1alpha1.UnsealLedger, error)
	// SaveLedger creates l (no resourceVersion) or updates it, and sets its
	// new resourceVersion.
	SaveLedger(ctx context.Context, l *v1alpha1.UnsealLedger) error
	// DeleteLedger removes a segment.
	DeleteLedger(ctx context.Context, l *v1alpha1.UnsealLedger) error

	// Event records a decision or an alarm about a record.
	Event(ref *v1alpha1.SovraNode, warning bool, reason, message string)
	// Refused records a refused call about a record; equal refusals are
	// folded into one event with a count, and a flood is throttled.
	Refused(ref *v1alpha1.SovraNode, reason, message string)
}

// kubeStore is the Store on the Kubernetes API with an informer cache.
type kubeStore struct {
	client   client.Client
	cache    cache.Cache
	nodes    toolscache.SharedIndexInformer
	claims   toolscache.SharedIndexInformer
	ledgers  toolscache.SharedIndexInformer
	events   record.EventBroadcaster
	decided  record.EventRecorder
	refusals record.EventRecorder
	logger   *zap.Logger
}

// newKubeStore connects to the API at cfg and waits for the sovra.dev CRDs,
// which the daemon installs. replica names this replica's ledger segments.
func newKubeStore(ctx context.Context, cfg *rest.Config, replica string, logger *zap.Logger) (*kubeStore, error) {
	scheme, err := attestation.Scheme()
	if err != nil {
		return nil, err
	}
	cfg = rest.CopyConfig(cfg)
	cfg.QPS, cfg.Burst = clientQPS, clientBurst
	jsonCfg := rest.CopyConfig(cfg)
	jsonCfg.ContentType = runtime.ContentTypeJSON
	c, err := client.New(jsonCfg, client.Options{Scheme: scheme})
	if err != nil {
		return nil, fmt.Errorf("creating API client: %w", err)
	}
	if err := attestation.WaitForCRDs(ctx, c); err != nil {
		return nil, err
	}
	// This replica's own segments stay out of the cache: it writes them
	// from memory, and decoding every one of its writes again would cost a
	// boot storm as much as writing it.
	others, err := labels.NewRequirement(v1alpha1.LabelReplica, selection.NotEquals, []string{replica})
	if err != nil {
		return nil, fmt.Errorf("selecting the other replicas' ledgers: %w", err)
	}
	ca, err := cache.New(jsonCfg, cache.Options{Scheme: scheme, ByObject: map[client.Object]cache.ByObject{
		&v1alpha1.SovraNode{}:    {Transform: slim},
		&v1alpha1.UnsealLedger{}: {Label: labels.NewSelector().Add(*others)},
	}})
	if err != nil {
		return nil, fmt.Errorf("creating node cache: %w", err)
	}
	ks := &kubeStore{client: c, cache: ca, logger: logger}
	for _, inf := range []struct {
		obj client.Object
		to  *toolscache.SharedIndexInformer
	}{{&v1alpha1.SovraNode{}, &ks.nodes}, {&v1alpha1.UUIDClaim{}, &ks.claims}, {&v1alpha1.UnsealLedger{}, &ks.ledgers}} {
		i, err := ca.GetInformer(ctx, inf.obj)
		if err != nil {
			return nil, fmt.Errorf("creating informer: %w", err)
		}
		sii, ok := i.(toolscache.SharedIndexInformer)
		if !ok {
			return nil, errors.New("creating informer: not a shared index informer")
		}
		*inf.to = sii
	}
	if err := ks.nodes.AddIndexers(toolscache.Indexers{uuidIndex: indexUUID}); err != nil {
		return nil, fmt.Errorf("indexing nodes by UUID: %w", err)
	}
	protoCfg := rest.CopyConfig(cfg)
	protoCfg.ContentType = runtime.ContentTypeProtobuf
	events, err := kubernetes.NewForConfig(protoCfg)
	if err != nil {
		return nil, fmt.Errorf("creating API client: %w", err)
	}
	ks.events = record.NewBroadcaster()
	ks.events.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: events.CoreV1().Events(attestation.EventNamespace)})
	ks.decided = ks.events.NewRecorder(scheme, corev1.EventSource{Component: eventSource})
	ks.refusals = ks.events.NewRecorder(scheme, corev1.EventSource{Component: refusalSource})
	return ks, nil
}

// slim drops from a cached record what the KMS never reads from the cache
// (keys, certificates, PCRs, claims, managed fields), so that 10 000 nodes
// cost little memory. Whatever must be exact is read from the API.
func slim(obj any) (any, error) {
	n, ok := obj.(*v1alpha1.SovraNode)
	if !ok {
		return obj, nil
	}
	n.ManagedFields = nil
	n.Spec.EKCertificate, n.Spec.EKPublic, n.Spec.AKPublic = nil, nil, nil
	n.Status.PCRs, n.Status.Claims, n.Status.Warnings, n.Status.Message = nil, nil, nil, ""
	return n, nil
}

func indexUUID(obj any) ([]string, error) {
	n, ok := obj.(*v1alpha1.SovraNode)
	if !ok || n.Spec.UUID == "" {
		return nil, nil
	}
	return []string{strings.ToLower(n.Spec.UUID)}, nil
}

// start runs the cache until ctx ends and waits for its first sync.
func (k *kubeStore) start(ctx context.Context) error {
	go func() {
		if err := k.cache.Start(ctx); err != nil {
			k.logger.Error("node cache stopped", zap.Error(err))
		}
	}()
	go func() {
		<-ctx.Done()
		k.events.Shutdown()
	}()
	if !k.cache.WaitForCacheSync(ctx) {
		return errors.New("waiting for the node cache to sync: context ended")
	}
	return nil
}

func (k *kubeStore) ByUUID(uuid string) []*v1alpha1.SovraNode {
	objs, err := k.nodes.GetIndexer().ByIndex(uuidIndex, uuid)
	if err != nil {
		return nil
	}
	return typed[v1alpha1.SovraNode](objs)
}

func (k *kubeStore) List() []*v1alpha1.SovraNode {
	return typed[v1alpha1.SovraNode](k.nodes.GetIndexer().List())
}

func (k *kubeStore) Node(name string) *v1alpha1.SovraNode {
	return get[v1alpha1.SovraNode](k.nodes, name)
}

func (k *kubeStore) Claim(uuid string) *v1alpha1.UUIDClaim {
	return get[v1alpha1.UUIDClaim](k.claims, uuid)
}

func (k *kubeStore) Ledgers() []*v1alpha1.UnsealLedger {
	return typed[v1alpha1.UnsealLedger](k.ledgers.GetIndexer().List())
}

func get[T any](inf toolscache.SharedIndexInformer, name string) *T {
	obj, ok, err := inf.GetIndexer().GetByKey(name)
	if err != nil || !ok {
		return nil
	}
	t, _ := obj.(*T)
	return t
}

func typed[T any](objs []any) []*T {
	out := make([]*T, 0, len(objs))
	for _, o := range objs {
		if t, ok := o.(*T); ok {
			out = append(out, t)
		}
	}
	return out
}

func (k *kubeStore) Get(ctx context.Context, name string) (*v1alpha1.SovraNode, error) {
	var n v1alpha1.SovraNode
	if err := k.client.Get(ctx, client.ObjectKey{Name: name}, &n); err != nil {
		if apierrors.IsNotFound(err) {
			return nil, errNotFound
		}
		return nil, fmt.Errorf("reading node %s: %w", name, err)
	}
	return &n, nil
}

func (k *kubeStore) Create(ctx context.Context, n *v1alpha1.SovraNode) error {
	status := n.Status
	if err := k.client.Create(ctx, n); err != nil {
		if apierrors.IsAlreadyExists(err) {
			return errExists
		}
		return fmt.Errorf("creating node %s: %w", n.Name, err)
	}
	n.Status = status
	return k.UpdateStatus(ctx, n)
}

func (k *kubeStore) Update(ctx context.Context, n *v1alpha1.SovraNode) error {
	return wrapWrite(n.Name, k.client.Update(ctx, n))
}

func (k *kubeStore) UpdateStatus(ctx context.Context, n *v1alpha1.SovraNode) error {
	return wrapWrite(n.Name, k.client.Status().Update(ctx, n))
}

func wrapWrite(name string, err error) error {
	switch {
	case err == nil:
		return nil
	case apierrors.IsConflict(err):
		return errConflict
	case apierrors.IsNotFound(err):
		return errNotFound
	default:
		return fmt.Errorf("writing node %s: %w", name, err)
	}
}

func (k *kubeStore) Annotate(ctx context.Context, name string, set map[string]*string) error {
	patch, err := annotationPatch(set)
	if err != nil {
		return err
	}
	obj := &v1alpha1.SovraNode{ObjectMeta: metav1.ObjectMeta{Name: name}}
	if err := k.client.Patch(ctx, obj, client.RawPatch(types.MergePatchType, patch)); err != nil {
		if apierrors.IsNotFound(err) {
			return errNotFound
		}
		return fmt.Errorf("annotating node %s: %w", name, err)
	}
	return nil
}

func (k *kubeStore) Delete(ctx context.Context, n *v1alpha1.SovraNode) error {
	err := k.client.Delete(ctx, n, client.Preconditions{UID: &n.UID})
	if err != nil && !apierrors.IsNotFound(err) {
		if apierrors.IsConflict(err) {
			return errConflict
		}
		return fmt.Errorf("deleting node %s: %w", n.Name, err)
	}
	return nil
}

func (k *kubeStore) CreateClaim(ctx context.Context, c *v1alpha1.UUIDClaim) error {
	if err := k.client.Create(ctx, c); err != nil {
		if apierrors.IsAlreadyExists(err) {
			return errExists
		}
		return fmt.Errorf("claiming UUID %s: %w", c.Name, err)
	}
	return nil
}

func (k *kubeStore) UpdateClaim(ctx context.Context, c *v1alpha1.UUIDClaim) error {
	err := k.client.Update(ctx, c)
	switch {
	case err == nil:
		return nil
	case apierrors.IsConflict(err), apierrors.IsNotFound(err):
		return errConflict
	default:
		return fmt.Errorf("updating the claim of UUID %s: %w", c.Name, err)
	}
}

func (k *kubeStore) OwnLedgers(ctx context.Context, replica string) ([]v1alpha1.UnsealLedger, error) {
	var list v1alpha1.UnsealLedgerList
	if err := k.client.List(ctx, &list, client.MatchingLabels{v1alpha1.LabelReplica: replica}); err != nil {
		return nil, fmt.Errorf("listing the ledger of replica %s: %w", replica, err)
	}
	slices.SortFunc(list.Items, func(a, b v1alpha1.UnsealLedger) int { return strings.Compare(a.Name, b.Name) })
	return list.Items, nil
}

func (k *kubeStore) SaveLedger(ctx context.Context, l *v1alpha1.UnsealLedger) error {
	var err error
	if l.ResourceVersion == "" {
		err = k.client.Create(ctx, l)
	} else {
		err = k.client.Update(ctx, l)
	}
	switch {
	case err == nil:
		return nil
	case apierrors.IsConflict(err), apierrors.IsAlreadyExists(err):
		return fmt.Errorf("writing ledger segment %s: %w", l.Name, errConflict)
	default:
		return fmt.Errorf("writing ledger segment %s: %w", l.Name, err)
	}
}

func (k *kubeStore) DeleteLedger(ctx context.Context, l *v1alpha1.UnsealLedger) error {
	if err := k.client.Delete(ctx, l); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("deleting ledger segment %s: %w", l.Name, err)
	}
	return nil
}

func (k *kubeStore) Event(ref *v1alpha1.SovraNode, warning bool, reason, message string) {
	k.decided.Event(eventRef(ref), eventType(warning), reason, message)
}

func (k *kubeStore) Refused(ref *v1alpha1.SovraNode, reason, message string) {
	k.refusals.Event(eventRef(ref), corev1.EventTypeWarning, reason, message)
}

// eventRef is what an event names: the record, with its kind for the
// recorder (cached objects carry no TypeMeta).
func eventRef(n *v1alpha1.SovraNode) *corev1.ObjectReference {
	return &corev1.ObjectReference{
		APIVersion: v1alpha1.GroupVersion.String(), Kind: "SovraNode", Name: n.Name, UID: n.UID,
	}
}

func eventType(warning bool) string {
	if warning {
		return corev1.EventTypeWarning
	}
	return corev1.EventTypeNormal
}

// recordWriteTimeout bounds one write of the sweeper or the ledger.
const recordWriteTimeout = 10 * time.Second
