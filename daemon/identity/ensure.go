package identity

import (
	"context"
	"fmt"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	flowcontrolv1 "k8s.io/api/flowcontrol/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

const (
	// fieldOwner is the field manager of everything Ensure applies.
	fieldOwner = "sovrad"
	// ensureRetry paces Ensure while the API server finishes starting.
	ensureRetry = 500 * time.Millisecond
)

// Ensure applies objs (see Objects) with loopback, the API server's
// superuser, retrying until every one is in place or ctx ends. The
// components must not start before it returns: without their RBAC they are
// refused everything.
func Ensure(ctx context.Context, loopback *rest.Config, objs []client.Object, log *zap.Logger) error {
	scheme := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{corev1.AddToScheme, rbacv1.AddToScheme, flowcontrolv1.AddToScheme} {
		if err := add(scheme); err != nil {
			return fmt.Errorf("ensuring the components' RBAC: %w", err)
		}
	}
	c, err := client.New(loopback, client.Options{Scheme: scheme})
	if err != nil {
		return fmt.Errorf("ensuring the components' RBAC: %w", err)
	}
	begin := time.Now()
	err = wait.PollUntilContextCancel(ctx, ensureRetry, true, func(ctx context.Context) (bool, error) {
		for _, want := range objs {
			// Patch writes the answer into obj: apply a copy, so a retry sends want again.
			obj := want.DeepCopyObject().(client.Object)
			if err := c.Patch(ctx, obj, client.Apply, client.FieldOwner(fieldOwner), client.ForceOwnership); err != nil {
				log.Debug("ensuring the components' RBAC, will retry", zap.String("object", obj.GetName()), zap.Error(err))
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil {
		return fmt.Errorf("ensuring the components' RBAC: %w", err)
	}
	log.Info("component identities and their RBAC in place", zap.Strings("users", Users), zap.Int("objects", len(objs)),
		zap.Duration("took", time.Since(begin)))
	return nil
}
