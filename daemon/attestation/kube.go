package attestation

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
)

const (
	// EventNamespace holds events about cluster-scoped SovraNodes, as
	// Kubernetes does for Nodes.
	EventNamespace = "default"
	// EventSource is the component named in events.
	EventSource = "sovrad-nodeapi"
	// eventSuffixLen is the random hex suffix of event names.
	eventSuffixLen = 8
)

// Scheme returns a scheme with the types the KubeStore reads and writes,
// and CustomResourceDefinitions for InstallCRDs.
func Scheme() (*runtime.Scheme, error) {
	s := runtime.NewScheme()
	if err := corev1.AddToScheme(s); err != nil {
		return nil, fmt.Errorf("building scheme: %w", err)
	}
	if err := v1alpha1.AddToScheme(s); err != nil {
		return nil, fmt.Errorf("building scheme: %w", err)
	}
	if err := apiextensionsv1.AddToScheme(s); err != nil {
		return nil, fmt.Errorf("building scheme: %w", err)
	}
	return s, nil
}

// KubeStore keeps nodes, used nonces, UUID claims and policies in the
// Kubernetes API.
type KubeStore struct {
	Client client.Client
	Logger *zap.Logger
}

// NewKubeStore connects to the API described by cfg, speaking JSON.
func NewKubeStore(cfg *rest.Config, logger *zap.Logger) (*KubeStore, error) {
	s, err := Scheme()
	if err != nil {
		return nil, err
	}
	cfg = rest.CopyConfig(cfg)
	cfg.ContentType = runtime.ContentTypeJSON
	c, err := client.New(cfg, client.Options{Scheme: s})
	if err != nil {
		return nil, fmt.Errorf("creating API client: %w", err)
	}
	if logger == nil {
		logger = zap.NewNop()
	}
	return &KubeStore{Client: c, Logger: logger}, nil
}

var _ Store = (*KubeStore)(nil)

// CreateNonce implements Store.
func (k *KubeStore) CreateNonce(ctx context.Context, n *v1alpha1.AttestationNonce) error {
	if err := k.Client.Create(ctx, n); err != nil {
		if apierrors.IsAlreadyExists(err) {
			return ErrNonce
		}
		return fmt.Errorf("recording used nonce: %w", err)
	}
	return nil
}

// DeleteExpiredNonces implements Store.
func (k *KubeStore) DeleteExpiredNonces(ctx context.Context, t time.Time) (int, error) {
	var list v1alpha1.AttestationNonceList
	if err := k.Client.List(ctx, &list); err != nil {
		return 0, fmt.Errorf("listing nonces: %w", err)
	}
	n := 0
	for i := range list.Items {
		if list.Items[i].Spec.ExpiresAt.Time.After(t) {
			continue
		}
		m := &list.Items[i]
		err := k.Client.Delete(ctx, m, client.Preconditions{UID: &m.UID})
		switch {
		case err == nil:
			n++
		case !apierrors.IsNotFound(err) && !apierrors.IsConflict(err):
			return n, fmt.Errorf("deleting used nonce %s: %w", m.Name, err)
		}
	}
	return n, nil
}

// GetNode implements Store.
func (k *KubeStore) GetNode(ctx context.Context, name string) (*v1alpha1.SovraNode, error) {
	var n v1alpha1.SovraNode
	if err := k.Client.Get(ctx, client.ObjectKey{Name: name}, &n); err != nil {
		if apierrors.IsNotFound(err) {
			return nil, ErrNodeNotFound
		}
		return nil, fmt.Errorf("reading node %s: %w", name, err)
	}
	return &n, nil
}

// NodesByUUID implements Store.
func (k *KubeStore) NodesByUUID(ctx context.Context, uuid string) ([]v1alpha1.SovraNode, error) {
	var list v1alpha1.SovraNodeList
	if err := k.Client.List(ctx, &list, client.MatchingLabels{v1alpha1.LabelUUID: uuid}); err != nil {
		return nil, fmt.Errorf("listing nodes by UUID: %w", err)
	}
	return list.Items, nil
}

// CreateNode implements Store: it creates the object, then writes its
// status through the status subresource.
func (k *KubeStore) CreateNode(ctx context.Context, n *v1alpha1.SovraNode) error {
	status := n.Status
	if err := k.Client.Create(ctx, n); err != nil {
		if apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("creating node %s: %w", n.Name, ErrConflict)
		}
		return fmt.Errorf("creating node %s: %w", n.Name, err)
	}
	n.Status = status
	return k.UpdateNodeStatus(ctx, n)
}

// UpdateNode implements Store.
func (k *KubeStore) UpdateNode(ctx context.Context, n *v1alpha1.SovraNode) error {
	return wrapUpdate(n.Name, k.Client.Update(ctx, n))
}

// UpdateNodeStatus implements Store.
func (k *KubeStore) UpdateNodeStatus(ctx context.Context, n *v1alpha1.SovraNode) error {
	return wrapUpdate(n.Name, k.Client.Status().Update(ctx, n))
}

func wrapUpdate(name string, err error) error {
	switch {
	case err == nil:
		return nil
	case apierrors.IsConflict(err):
		return fmt.Errorf("updating node %s: %w", name, ErrConflict)
	case apierrors.IsNotFound(err):
		return fmt.Errorf("updating node %s: %w", name, ErrNodeNotFound)
	default:
		return fmt.Errorf("updating node %s: %w", name, err)
	}
}

// GetClaim implements Store.
func (k *KubeStore) GetClaim(ctx context.Context, uuid string) (*v1alpha1.UUIDClaim, error) {
	var c v1alpha1.UUIDClaim
	if err := k.Client.Get(ctx, client.ObjectKey{Name: uuid}, &c); err != nil {
		if apierrors.IsNotFound(err) {
			return nil, ErrClaimNotFound
		}
		return nil, fmt.Errorf("reading the claim of UUID %s: %w", uuid, err)
	}
	return &c, nil
}

// CreateClaim implements Store.
func (k *KubeStore) CreateClaim(ctx context.Context, c *v1alpha1.UUIDClaim) error {
	if err := k.Client.Create(ctx, c); err != nil {
		if apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("claiming UUID %s: %w", c.Name, ErrConflict)
		}
		return fmt.Errorf("claiming UUID %s: %w", c.Name, err)
	}
	return nil
}

// UpdateClaim implements Store.
func (k *KubeStore) UpdateClaim(ctx context.Context, c *v1alpha1.UUIDClaim) error {
	err := k.Client.Update(ctx, c)
	switch {
	case err == nil:
		return nil
	case apierrors.IsConflict(err), apierrors.IsNotFound(err):
		return fmt.Errorf("updating the claim of UUID %s: %w", c.Name, ErrConflict)
	default:
		return fmt.Errorf("updating the claim of UUID %s: %w", c.Name, err)
	}
}

// DeleteClaim implements Store.
func (k *KubeStore) DeleteClaim(ctx context.Context, c *v1alpha1.UUIDClaim) error {
	err := k.Client.Delete(ctx, c, client.Preconditions{UID: &c.UID, ResourceVersion: &c.ResourceVersion})
	switch {
	case err == nil, apierrors.IsNotFound(err):
		return nil
	case apierrors.IsConflict(err):
		return fmt.Errorf("deleting the stale claim of UUID %s: %w", c.Name, ErrConflict)
	default:
		return fmt.Errorf("deleting the stale claim of UUID %s: %w", c.Name, err)
	}
}

// ListPolicies implements Store.
func (k *KubeStore) ListPolicies(ctx context.Context) ([]v1alpha1.AttestationPolicy, error) {
	var list v1alpha1.AttestationPolicyList
	if err := k.Client.List(ctx, &list); err != nil {
		return nil, fmt.Errorf("listing attestation policies: %w", err)
	}
	return list.Items, nil
}

// Event implements Store by creating a core/v1 Event in EventNamespace. A
// failure to record is logged, never returned: the decision stands.
func (k *KubeStore) Event(ctx context.Context, obj runtime.Object, warning bool, reason, message string) {
	m, ok := obj.(metav1.Object)
	if !ok {
		return
	}
	suffix := make([]byte, eventSuffixLen/2)
	_, _ = rand.Read(suffix)
	typ := corev1.EventTypeNormal
	if warning {
		typ = corev1.EventTypeWarning
	}
	now := metav1.Now()
	ev := &corev1.Event{
		ObjectMeta: metav1.ObjectMeta{Name: m.GetName() + "." + hex.EncodeToString(suffix), Namespace: EventNamespace},
		InvolvedObject: corev1.ObjectReference{
			APIVersion: v1alpha1.GroupVersion.String(), Kind: "SovraNode",
			Name: m.GetName(), UID: m.GetUID(), ResourceVersion: m.GetResourceVersion(),
		},
		Reason: reason, Message: message, Type: typ,
		Source:         corev1.EventSource{Component: EventSource},
		FirstTimestamp: now, LastTimestamp: now, Count: 1,
		ReportingController: EventSource,
	}
	if err := k.Client.Create(ctx, ev); err != nil {
		k.Logger.Warn("recording event", zap.String("node", m.GetName()), zap.String("reason", reason), zap.Error(err))
	}
}
