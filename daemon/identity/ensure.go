package identity

import (
	"context"
	"fmt"
	"strings"
	"time"

	"go.uber.org/zap"
	authorizationv1 "k8s.io/api/authorization/v1"
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
	for _, add := range []func(*runtime.Scheme) error{
		corev1.AddToScheme, rbacv1.AddToScheme, flowcontrolv1.AddToScheme, authorizationv1.AddToScheme,
	} {
		if err := add(scheme); err != nil {
			return fmt.Errorf("ensuring the components' RBAC: %w", err)
		}
	}
	c, err := client.New(loopback, client.Options{Scheme: scheme})
	if err != nil {
		return fmt.Errorf("ensuring the components' RBAC: %w", err)
	}
	begin := time.Now()
	applied := 0
	err = wait.PollUntilContextCancel(ctx, ensureRetry, true, func(ctx context.Context) (bool, error) {
		for ; applied < len(objs); applied++ {
			// Patch writes the answer into obj: apply a copy, so a retry sends the object again.
			obj := objs[applied].DeepCopyObject().(client.Object)
			if err := c.Patch(ctx, obj, client.Apply, client.FieldOwner(fieldOwner), client.ForceOwnership); err != nil {
				log.Debug("ensuring the components' RBAC, will retry", zap.String("object", obj.GetName()), zap.Error(err))
				return false, nil
			}
		}
		// The authorizer sees new bindings through its cache: wait until it
		// grants each binding's first rule, so no component starts refused.
		for _, b := range objs {
			if allowed, err := effective(ctx, c, b); err != nil || !allowed {
				log.Debug("waiting for the components' RBAC to take effect", zap.String("binding", b.GetName()), zap.Error(err))
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

// effective reports whether the authorizer grants a binding's subject the
// first rule of the role it binds; objects other than bindings are.
func effective(ctx context.Context, c client.Client, obj client.Object) (bool, error) {
	var (
		ref      rbacv1.RoleRef
		subjects []rbacv1.Subject
		ns       string
	)
	switch b := obj.(type) {
	case *rbacv1.ClusterRoleBinding:
		ref, subjects = b.RoleRef, b.Subjects
	case *rbacv1.RoleBinding:
		ref, subjects, ns = b.RoleRef, b.Subjects, b.Namespace
	default:
		return true, nil
	}
	var rules []rbacv1.PolicyRule
	if ref.Kind == "Role" {
		var r rbacv1.Role
		if err := c.Get(ctx, client.ObjectKey{Namespace: ns, Name: ref.Name}, &r); err != nil {
			return false, err
		}
		rules = r.Rules
	} else {
		var r rbacv1.ClusterRole
		if err := c.Get(ctx, client.ObjectKey{Name: ref.Name}, &r); err != nil {
			return false, err
		}
		rules = r.Rules
	}
	if len(rules) == 0 || len(subjects) == 0 {
		return true, nil
	}
	rule := rules[0]
	attrs := &authorizationv1.ResourceAttributes{Namespace: ns}
	if len(rule.Verbs) > 0 {
		attrs.Verb = rule.Verbs[0]
	}
	if len(rule.APIGroups) > 0 {
		attrs.Group = rule.APIGroups[0]
	}
	if len(rule.Resources) > 0 {
		attrs.Resource, attrs.Subresource, _ = strings.Cut(rule.Resources[0], "/")
	}
	if len(rule.ResourceNames) > 0 {
		attrs.Name = rule.ResourceNames[0]
	}
	var nonResource *authorizationv1.NonResourceAttributes
	if len(rule.NonResourceURLs) > 0 {
		attrs, nonResource = nil, &authorizationv1.NonResourceAttributes{Path: rule.NonResourceURLs[0], Verb: rule.Verbs[0]}
	}
	sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
		User: subjects[0].Name, Groups: []string{Group}, ResourceAttributes: attrs, NonResourceAttributes: nonResource,
	}}
	if err := c.Create(ctx, sar); err != nil {
		return false, err
	}
	return sar.Status.Allowed, nil
}
