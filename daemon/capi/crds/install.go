package crds

import (
	"context"
	"encoding/base64"
	"fmt"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/version"
	"k8s.io/apimachinery/pkg/util/wait"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

const (
	// FieldManager owns everything in the CRDs but their conversion settings.
	FieldManager = "sovrad"
	// ConversionFieldManager owns spec.conversion: where the conversion
	// webhook is and the CA that verifies it. It is a separate manager so that
	// a replica's start does not take the webhook away from the leader.
	ConversionFieldManager = "sovrad-webhooks"
	// SourceAnnotation records the module@version a CRD was installed from, so
	// an older binary never downgrades a CRD a newer one installed.
	SourceAnnotation = "capi.sovra.dev/source"

	establishedPollInterval = 100 * time.Millisecond
)

// Conversion says where the conversion webhook of every CRD that declares
// one is served.
type Conversion struct {
	// URL is the webhook server's base URL: https://host:port.
	URL string
	// CABundle is the PEM CA that verifies the webhook's serving certificate.
	CABundle []byte
}

// Install server-side applies every CRD of providers. A CRD that another
// sovrad installed from a newer version of the same module is left alone. A
// CRD that declares webhook conversion and does not yet point at a webhook is
// pointed at conv; one that already does is left to the leader (see
// ApplyConversion).
func Install(ctx context.Context, c client.Client, providers []Provider, conv Conversion, log *zap.Logger) error {
	for _, p := range providers {
		for _, crd := range p.CRDs {
			if err := installOne(ctx, c, p.Module, crd, conv, log); err != nil {
				return fmt.Errorf("installing CRD %s: %w", crd.GetName(), err)
			}
		}
	}
	return nil
}

func installOne(ctx context.Context, c client.Client, module string, crd *unstructured.Unstructured, conv Conversion, log *zap.Logger) error {
	have := &apiextensionsv1.CustomResourceDefinition{}
	err := c.Get(ctx, client.ObjectKey{Name: crd.GetName()}, have)
	exists := err == nil
	if err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	if exists && newer(have.Annotations[SourceAnnotation], module) {
		log.Info("keeping CRD installed by a newer sovrad", zap.String("crd", crd.GetName()),
			zap.String("installed", have.Annotations[SourceAnnotation]), zap.String("ours", module))
		return nil
	}

	want := crd.DeepCopy()
	unstructured.RemoveNestedField(want.Object, "spec", "conversion")
	if err := pruneUnserved(want, have.Status.StoredVersions); err != nil {
		return err
	}
	annotations := want.GetAnnotations()
	if annotations == nil {
		annotations = map[string]string{}
	}
	annotations[SourceAnnotation] = module
	want.SetAnnotations(annotations)
	if err := c.Patch(ctx, want, client.Apply, client.FieldOwner(FieldManager), client.ForceOwnership); err != nil {
		return err
	}
	if !HasConversionWebhook(crd) {
		return nil
	}
	if exists && have.Spec.Conversion != nil && have.Spec.Conversion.Strategy == apiextensionsv1.WebhookConverter &&
		have.Spec.Conversion.Webhook != nil && have.Spec.Conversion.Webhook.ClientConfig != nil &&
		have.Spec.Conversion.Webhook.ClientConfig.URL != nil {
		return nil
	}
	return ApplyConversion(ctx, c, crd, conv)
}

// pruneUnserved drops the versions upstream keeps only to migrate objects an
// old release stored (served: false), unless the database still stores
// objects at one of them (storedVersions). The API server builds schemas,
// validators and OpenAPI for every version of a CRD: Cluster API's
// v1alpha3/v1alpha4 would cost every replica about 55 MB for versions no
// client can use.
func pruneUnserved(crd *unstructured.Unstructured, storedVersions []string) error {
	versions, found, err := unstructured.NestedSlice(crd.Object, "spec", "versions")
	if err != nil || !found {
		return fmt.Errorf("reading spec.versions: %v", err)
	}
	kept := versions[:0]
	for _, v := range versions {
		m, _ := v.(map[string]any)
		name, _ := m["name"].(string)
		served, _ := m["served"].(bool)
		storage, _ := m["storage"].(bool)
		if served || storage || slices.Contains(storedVersions, name) {
			kept = append(kept, v)
		}
	}
	return unstructured.SetNestedSlice(crd.Object, kept, "spec", "versions")
}

// ApplyConversion points the conversion webhook of crd (an embedded CRD that
// declares one) at conv.
func ApplyConversion(ctx context.Context, c client.Client, crd *unstructured.Unstructured, conv Conversion) error {
	versions, _, _ := unstructured.NestedStringSlice(crd.Object, "spec", "conversion", "webhook", "conversionReviewVersions")
	reviewVersions := make([]any, 0, len(versions))
	for _, v := range versions {
		reviewVersions = append(reviewVersions, v)
	}
	u := &unstructured.Unstructured{}
	u.SetAPIVersion(apiextensionsv1.SchemeGroupVersion.String())
	u.SetKind("CustomResourceDefinition")
	u.SetName(crd.GetName())
	u.Object["spec"] = map[string]any{
		"conversion": map[string]any{
			"strategy": string(apiextensionsv1.WebhookConverter),
			"webhook": map[string]any{
				"conversionReviewVersions": reviewVersions,
				"clientConfig": map[string]any{
					"url":      strings.TrimSuffix(conv.URL, "/") + ConvertPath,
					"caBundle": base64.StdEncoding.EncodeToString(conv.CABundle),
				},
			},
		},
	}
	if err := c.Patch(ctx, u, client.Apply, client.FieldOwner(ConversionFieldManager), client.ForceOwnership); err != nil {
		return fmt.Errorf("pointing the conversion webhook of %s at %s: %w", crd.GetName(), conv.URL, err)
	}
	return nil
}

// ConvertPath is where controller-runtime serves CRD conversion.
const ConvertPath = "/convert"

// WaitEstablished waits until every named CRD is Established or ctx ends.
func WaitEstablished(ctx context.Context, c client.Client, names []string) error {
	for _, name := range names {
		err := wait.PollUntilContextCancel(ctx, establishedPollInterval, true, func(ctx context.Context) (bool, error) {
			crd := &apiextensionsv1.CustomResourceDefinition{}
			if err := c.Get(ctx, client.ObjectKey{Name: name}, crd); err != nil {
				return false, nil //nolint:nilerr // retried until ctx ends
			}
			for _, cond := range crd.Status.Conditions {
				if cond.Type == apiextensionsv1.Established && cond.Status == apiextensionsv1.ConditionTrue {
					return true, nil
				}
			}
			return false, nil
		})
		if err != nil {
			return fmt.Errorf("waiting for CRD %s to be established: %w", name, err)
		}
	}
	return nil
}

// newer reports whether installed (module@version) is the same module as ours
// at a higher semantic version.
func newer(installed, ours string) bool {
	im, iv, ok1 := strings.Cut(installed, "@")
	om, ov, ok2 := strings.Cut(ours, "@")
	if !ok1 || !ok2 || im != om {
		return false
	}
	a, err1 := version.ParseSemantic(iv)
	b, err2 := version.ParseSemantic(ov)
	if err1 != nil || err2 != nil {
		return false
	}
	return a.GreaterThan(b)
}
