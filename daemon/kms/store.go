package kms

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	toolscache "k8s.io/client-go/tools/cache"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/attestation"
)

const (
	// uuidIndex indexes SovraNodes by their lower-cased spec.uuid.
	uuidIndex = "kms.sovra.dev/uuid"
	// clientQPS and clientBurst let the KMS's writes (salts, audit events,
	// deadlines) keep up with a boot storm; the API server bounds them too.
	clientQPS   = 500
	clientBurst = 1000
	// eventSource names the KMS in the events it records.
	eventSource = "sovrad-kms"
)

// Sentinel errors of the store.
var (
	errNotFound = errors.New("node record not found")
	errConflict = errors.New("node record changed concurrently")
	errExists   = errors.New("node record already exists")
)

// Store is what the KMS reads and writes: a cached index of node records
// for the hot path and the API for everything that must be exact.
type Store interface {
	// ByUUID returns the cached records claiming uuid (lower case). The
	// records are shared: callers must not modify them.
	ByUUID(uuid string) []*v1alpha1.SovraNode
	// List returns every cached record, shared likewise.
	List() []*v1alpha1.SovraNode
	// Node returns the cached record name, nil when there is none.
	Node(name string) *v1alpha1.SovraNode
	// Get reads a record from the API, not the cache.
	Get(ctx context.Context, name string) (*v1alpha1.SovraNode, error)
	// Create creates a record (spec, labels and annotations), then its status.
	Create(ctx context.Context, n *v1alpha1.SovraNode) error
	// UpdateStatus writes n's status if n's resourceVersion is current.
	UpdateStatus(ctx context.Context, n *v1alpha1.SovraNode) error
	// Annotate merges annotations into a record; nil values remove keys.
	Annotate(ctx context.Context, name string, set map[string]*string) error
	// Delete removes exactly this record (by UID).
	Delete(ctx context.Context, n *v1alpha1.SovraNode) error
	// Event records an audit event about a record (which may not exist).
	Event(ctx context.Context, ref *v1alpha1.SovraNode, warning bool, reason, message string) error
}

// kubeStore is the Store on the Kubernetes API with an informer cache.
type kubeStore struct {
	client   client.Client
	events   kubernetes.Interface
	cache    cache.Cache
	informer toolscache.SharedIndexInformer
	logger   *zap.Logger
}

func newKubeStore(ctx context.Context, cfg *rest.Config, installCRDs bool, logger *zap.Logger) (*kubeStore, error) {
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
	if installCRDs {
		if err := attestation.InstallCRDs(ctx, c); err != nil {
			return nil, err
		}
	}
	if err := attestation.WaitForCRDs(ctx, c); err != nil {
		return nil, err
	}
	protoCfg := rest.CopyConfig(cfg)
	protoCfg.ContentType = runtime.ContentTypeProtobuf
	events, err := kubernetes.NewForConfig(protoCfg)
	if err != nil {
		return nil, fmt.Errorf("creating API client: %w", err)
	}
	ca, err := cache.New(jsonCfg, cache.Options{Scheme: scheme, ByObject: map[client.Object]cache.ByObject{
		&v1alpha1.SovraNode{}: {Transform: slim},
	}})
	if err != nil {
		return nil, fmt.Errorf("creating node cache: %w", err)
	}
	inf, err := ca.GetInformer(ctx, &v1alpha1.SovraNode{})
	if err != nil {
		return nil, fmt.Errorf("creating node informer: %w", err)
	}
	sii, ok := inf.(toolscache.SharedIndexInformer)
	if !ok {
		return nil, errors.New("creating node informer: not a shared index informer")
	}
	if err := sii.AddIndexers(toolscache.Indexers{uuidIndex: indexUUID}); err != nil {
		return nil, fmt.Errorf("indexing nodes by UUID: %w", err)
	}
	return &kubeStore{client: c, events: events, cache: ca, informer: sii, logger: logger}, nil
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
	if !k.cache.WaitForCacheSync(ctx) {
		return errors.New("waiting for the node cache to sync: context ended")
	}
	return nil
}

func (k *kubeStore) ByUUID(uuid string) []*v1alpha1.SovraNode {
	objs, err := k.informer.GetIndexer().ByIndex(uuidIndex, uuid)
	if err != nil {
		return nil
	}
	return nodes(objs)
}

func (k *kubeStore) List() []*v1alpha1.SovraNode { return nodes(k.informer.GetIndexer().List()) }

func (k *kubeStore) Node(name string) *v1alpha1.SovraNode {
	obj, ok, err := k.informer.GetIndexer().GetByKey(name)
	if err != nil || !ok {
		return nil
	}
	n, _ := obj.(*v1alpha1.SovraNode)
	return n
}

func nodes(objs []any) []*v1alpha1.SovraNode {
	out := make([]*v1alpha1.SovraNode, 0, len(objs))
	for _, o := range objs {
		if n, ok := o.(*v1alpha1.SovraNode); ok {
			out = append(out, n)
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

func (k *kubeStore) UpdateStatus(ctx context.Context, n *v1alpha1.SovraNode) error {
	err := k.client.Status().Update(ctx, n)
	switch {
	case err == nil:
		return nil
	case apierrors.IsConflict(err):
		return errConflict
	case apierrors.IsNotFound(err):
		return errNotFound
	default:
		return fmt.Errorf("updating status of node %s: %w", n.Name, err)
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

func (k *kubeStore) Event(ctx context.Context, ref *v1alpha1.SovraNode, warning bool, reason, message string) error {
	typ := corev1.EventTypeNormal
	if warning {
		typ = corev1.EventTypeWarning
	}
	now := metav1.NewTime(time.Now())
	ev := &corev1.Event{
		ObjectMeta: metav1.ObjectMeta{GenerateName: ref.Name + ".", Namespace: attestation.EventNamespace},
		InvolvedObject: corev1.ObjectReference{
			APIVersion: v1alpha1.GroupVersion.String(), Kind: "SovraNode",
			Name: ref.Name, UID: ref.UID,
		},
		Reason: reason, Message: message, Type: typ,
		Source:         corev1.EventSource{Component: eventSource},
		FirstTimestamp: now, LastTimestamp: now, Count: 1,
		ReportingController: eventSource,
	}
	if _, err := k.events.CoreV1().Events(attestation.EventNamespace).Create(ctx, ev, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("recording event on node %s: %w", ref.Name, err)
	}
	return nil
}
