package webhooks

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/sovra-dev/sovra/daemon/capi/crds"
)

const registerRetryInterval = 2 * time.Second

// Registrar points the API server at this replica's webhooks: the
// Mutating/ValidatingWebhookConfigurations of every provider (by URL, with the
// daemon's CA as caBundle) and the conversion webhook of every CRD that
// declares one. It runs on the leader only, once per leadership.
type Registrar struct {
	Client    client.Client
	Server    *Server
	Providers []crds.Provider
	CABundle  []byte
	Log       *zap.Logger
}

// NeedLeaderElection is true: only the leader's URL is registered.
func (r *Registrar) NeedLeaderElection() bool { return true }

// Start registers the webhooks, retrying until it succeeds or ctx ends.
func (r *Registrar) Start(ctx context.Context) error {
	err := wait.PollUntilContextCancel(ctx, registerRetryInterval, true, func(ctx context.Context) (bool, error) {
		if err := r.register(ctx); err != nil {
			r.Log.Warn("registering webhooks, will retry", zap.Error(err))
			return false, nil
		}
		return true, nil
	})
	if err != nil {
		return nil // ctx ended
	}
	r.Log.Info("registered Cluster API webhooks", zap.String("url", r.Server.URL()))
	return nil
}

func (r *Registrar) register(ctx context.Context) error {
	objs := Registrations(r.Providers, r.Server.URL(), r.CABundle, r.Server.Paths())
	for _, obj := range objs {
		if err := r.Client.Patch(ctx, obj, client.Apply, client.FieldOwner(crds.ConversionFieldManager), client.ForceOwnership); err != nil {
			return fmt.Errorf("registering %s: %w", obj.GetName(), err)
		}
	}
	conv := crds.Conversion{URL: r.Server.URL(), CABundle: r.CABundle}
	for _, p := range r.Providers {
		for _, crd := range p.CRDs {
			if crds.HasConversionWebhook(crd) {
				if err := crds.ApplyConversion(ctx, r.Client, crd, conv); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// Create creates, empty, every provider's webhook configuration that does
// not exist yet. It is a bootstrap step, run as the API server's superuser:
// the registrar (Cluster API's identity) may only patch these
// configurations, by name, and can create no other.
func Create(ctx context.Context, c client.Client, providers []crds.Provider) error {
	var objs []client.Object
	for _, p := range providers {
		for _, m := range p.Mutating {
			objs = append(objs, &admissionregistrationv1.MutatingWebhookConfiguration{ObjectMeta: metav1.ObjectMeta{Name: m.Name}})
		}
		for _, v := range p.Validating {
			objs = append(objs, &admissionregistrationv1.ValidatingWebhookConfiguration{ObjectMeta: metav1.ObjectMeta{Name: v.Name}})
		}
	}
	for _, obj := range objs {
		if err := c.Create(ctx, obj); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("creating webhook configuration %s: %w", obj.GetName(), err)
		}
	}
	return nil
}

// Registrations returns the providers' webhook configurations pointed at url
// (verified with caBundle), keeping only the webhooks whose path is in served:
// a webhook of a feature sovrad does not serve is dropped rather than
// registered to fail every request. Configurations left empty are omitted.
func Registrations(providers []crds.Provider, url string, caBundle []byte, served []string) []client.Object {
	var out []client.Object
	point := func(cc *admissionregistrationv1.WebhookClientConfig) {
		u := strings.TrimSuffix(url, "/") + hookPath(*cc)
		*cc = admissionregistrationv1.WebhookClientConfig{URL: &u, CABundle: caBundle}
	}
	for _, p := range providers {
		for _, m := range p.Mutating {
			want := m.DeepCopy()
			want.Webhooks = slices.DeleteFunc(want.Webhooks, func(w admissionregistrationv1.MutatingWebhook) bool {
				return !slices.Contains(served, hookPath(w.ClientConfig))
			})
			for i := range want.Webhooks {
				point(&want.Webhooks[i].ClientConfig)
			}
			if len(want.Webhooks) > 0 {
				out = append(out, want)
			}
		}
		for _, v := range p.Validating {
			want := v.DeepCopy()
			want.Webhooks = slices.DeleteFunc(want.Webhooks, func(w admissionregistrationv1.ValidatingWebhook) bool {
				return !slices.Contains(served, hookPath(w.ClientConfig))
			})
			for i := range want.Webhooks {
				point(&want.Webhooks[i].ClientConfig)
			}
			if len(want.Webhooks) > 0 {
				out = append(out, want)
			}
		}
	}
	return out
}

// hookPath is the path a webhook's client configuration calls: the Service
// path of the upstream manifests, or the path of a URL.
func hookPath(cc admissionregistrationv1.WebhookClientConfig) string {
	switch {
	case cc.Service != nil && cc.Service.Path != nil:
		return *cc.Service.Path
	case cc.URL != nil:
		rest := strings.TrimPrefix(*cc.URL, "https://")
		if i := strings.Index(rest, "/"); i >= 0 {
			return rest[i:]
		}
	}
	return "/"
}
