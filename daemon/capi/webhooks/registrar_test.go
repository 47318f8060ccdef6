package webhooks

import (
	"testing"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sovra-dev/sovra/daemon/capi/crds"
)

func TestRegistrationsPointAtTheServerAndDropUnservedHooks(t *testing.T) {
	path := func(p string) *string { return &p }
	svc := func(p string) admissionregistrationv1.WebhookClientConfig {
		return admissionregistrationv1.WebhookClientConfig{Service: &admissionregistrationv1.ServiceReference{Namespace: "capi-system", Name: "capi-webhook-service", Path: path(p)}}
	}
	providers := []crds.Provider{{
		Name: "cluster-api",
		Mutating: []*admissionregistrationv1.MutatingWebhookConfiguration{{
			ObjectMeta: metav1.ObjectMeta{Name: "capi-mutating-webhook-configuration"},
			Webhooks: []admissionregistrationv1.MutatingWebhook{
				{Name: "default.cluster.cluster.x-k8s.io", ClientConfig: svc("/mutate-cluster")},
				{Name: "default.extensionconfig.runtime.cluster.x-k8s.io", ClientConfig: svc("/mutate-extensionconfig")},
			},
		}},
		Validating: []*admissionregistrationv1.ValidatingWebhookConfiguration{{
			ObjectMeta: metav1.ObjectMeta{Name: "capi-validating-webhook-configuration"},
			Webhooks: []admissionregistrationv1.ValidatingWebhook{
				{Name: "validation.extensionconfig.runtime.cluster.x-k8s.io", ClientConfig: svc("/validate-extensionconfig")},
			},
		}},
	}}
	ca := []byte("ca-pem")
	objs := Registrations(providers, "https://10.0.0.7:40123", ca, []string{"/mutate-cluster", "/convert"})
	if len(objs) != 1 {
		t.Fatalf("got %d configurations, want only the mutating one (the validating one serves nothing)", len(objs))
	}
	m := objs[0].(*admissionregistrationv1.MutatingWebhookConfiguration)
	if len(m.Webhooks) != 1 || m.Webhooks[0].Name != "default.cluster.cluster.x-k8s.io" {
		t.Fatalf("webhooks kept: %+v", m.Webhooks)
	}
	cc := m.Webhooks[0].ClientConfig
	if cc.Service != nil || cc.URL == nil || *cc.URL != "https://10.0.0.7:40123/mutate-cluster" || string(cc.CABundle) != "ca-pem" {
		t.Fatalf("client config not pointed at the server: %+v", cc)
	}
	if providers[0].Mutating[0].Webhooks[0].ClientConfig.Service == nil {
		t.Fatal("Registrations changed the embedded manifests")
	}
	// Registering again (as a new leader does) reads the path from the URL.
	if got := hookPath(cc); got != "/mutate-cluster" {
		t.Fatalf("hookPath of a URL config = %q", got)
	}
}
