package infraref

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"strings"

	admissionv1 "k8s.io/api/admission/v1"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/validation/field"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	infrav1 "github.com/sovra-dev/sovra/daemon/apis/infrastructure/v1alpha1"
)

const (
	// Path is where the webhook is served.
	Path = "/validate-infrastructure-references"
	// ConfigurationName names the ValidatingWebhookConfiguration.
	ConfigurationName = "sovra-infrastructure-references"
	// webhookName names the webhook inside it.
	webhookName = "infrastructure-references.sovra.dev"
	// timeoutSeconds bounds the API server's call: one CRD read.
	timeoutSeconds = 5

	// The upstream Service the registration names, as upstream's manifests
	// do; the Registrar replaces it with sovrad's URL.
	serviceName      = "webhook-service"
	serviceNamespace = "sovra-system"

	capiGroup         = "cluster.x-k8s.io"
	capiVersion       = "v1beta1"
	controlPlaneGroup = "controlplane.cluster.x-k8s.io"
	cacpptVersion     = "v1alpha3"
)

// placement is where a kind of object holds its infrastructure reference,
// and which of sovra's kinds may be named there ("" for none).
type placement struct {
	resource string
	version  string
	field    []string
	want     string
	// what names the place in messages: "Cluster.spec.infrastructureRef".
	what string
}

var (
	templateRef = []string{"spec", "template", "spec", "infrastructureRef"}
	// placements are keyed by the referring object's group and kind.
	placements = map[schema.GroupKind]placement{
		{Group: capiGroup, Kind: "Cluster"}: {resource: "clusters", version: capiVersion,
			field: []string{"spec", "infrastructureRef"}, want: SovraCluster, what: "a Cluster's spec.infrastructureRef"},
		{Group: capiGroup, Kind: "Machine"}: {resource: "machines", version: capiVersion,
			field: []string{"spec", "infrastructureRef"}, want: SovraMachine, what: "a Machine's spec.infrastructureRef"},
		{Group: capiGroup, Kind: "MachineSet"}: {resource: "machinesets", version: capiVersion,
			field: templateRef, want: SovraMachineTemplate, what: "a MachineSet's spec.template.spec.infrastructureRef"},
		{Group: capiGroup, Kind: "MachineDeployment"}: {resource: "machinedeployments", version: capiVersion,
			field: templateRef, want: SovraMachineTemplate, what: "a MachineDeployment's spec.template.spec.infrastructureRef"},
		{Group: capiGroup, Kind: "MachinePool"}: {resource: "machinepools", version: capiVersion,
			field: templateRef, want: "", what: "a MachinePool's spec.template.spec.infrastructureRef"},
		{Group: controlPlaneGroup, Kind: "TalosControlPlane"}: {resource: "taloscontrolplanes", version: cacpptVersion,
			field: []string{"spec", "infrastructureTemplate"}, want: SovraMachineTemplate, what: "a TalosControlPlane's spec.infrastructureTemplate"},
	}
)

// Validator is the admission handler: see the package doc.
type Validator struct {
	// APIReader reads CRDs from the API, not a cache.
	APIReader client.Reader
}

var _ admission.Handler = (*Validator)(nil)

// Handle admits a create or update unless it sets an infrastructure
// reference sovrad cannot serve. An update that leaves the reference as it
// was, and any write to an object being deleted, is admitted: an object
// admitted once is never stuck behind this webhook (its finalizers can
// always be removed, even after its infrastructure CRD went away).
func (v *Validator) Handle(ctx context.Context, req admission.Request) admission.Response {
	gk := schema.GroupKind{Group: req.Kind.Group, Kind: req.Kind.Kind}
	p, ok := placements[gk]
	if !ok || (req.Operation != admissionv1.Create && req.Operation != admissionv1.Update) {
		return admission.Allowed("")
	}
	obj, err := decode(req.Object.Raw)
	if err != nil {
		return admission.Errored(http.StatusBadRequest, err)
	}
	if obj.GetDeletionTimestamp() != nil {
		return admission.Allowed("")
	}
	ref := refAt(obj, p.field)
	if ref.Kind == "" {
		return admission.Allowed("") // no reference: Cluster API's own validation decides
	}
	if req.Operation == admissionv1.Update {
		old, err := decode(req.OldObject.Raw)
		if err != nil {
			return admission.Errored(http.StatusBadRequest, err)
		}
		if refAt(old, p.field) == ref {
			return admission.Allowed("")
		}
	}
	path := field.NewPath(p.field[0], p.field[1:]...)
	gv, err := schema.ParseGroupVersion(ref.APIVersion)
	if err != nil {
		return invalid(gk, req.Name, field.Invalid(path.Child("apiVersion"), ref.APIVersion, err.Error()))
	}
	refGK := schema.GroupKind{Group: gv.Group, Kind: ref.Kind}
	if isSovraKind(refGK) {
		if ref.Kind != p.want {
			return invalid(gk, req.Name, field.Invalid(path.Child("kind"), ref.Kind, misplaced(p, ref.Kind)))
		}
		return admission.Allowed("")
	}
	crd, err := lookupCRD(ctx, v.APIReader, refGK)
	if err != nil {
		return admission.Errored(http.StatusInternalServerError, fmt.Errorf("checking %s: %w", path, err))
	}
	switch {
	case crd == nil:
		return invalid(gk, req.Name, field.Invalid(path.Child("kind"), ref.Kind, notServed(refGK, "no CustomResourceDefinition "+crdName(refGK)+" is installed")))
	case !crd.DeletionTimestamp.IsZero():
		return invalid(gk, req.Name, field.Invalid(path.Child("kind"), ref.Kind, notServed(refGK, "its CustomResourceDefinition "+crdName(refGK)+" is being deleted")))
	}
	return admission.Allowed("")
}

// reference is the part of an object reference the webhook checks.
type reference struct{ APIVersion, Kind string }

func refAt(obj *unstructured.Unstructured, path []string) reference {
	apiVersion, _, _ := unstructured.NestedString(obj.Object, append(path, "apiVersion")...)
	kind, _, _ := unstructured.NestedString(obj.Object, append(path, "kind")...)
	return reference{APIVersion: apiVersion, Kind: kind}
}

func decode(raw []byte) (*unstructured.Unstructured, error) {
	obj := &unstructured.Unstructured{}
	if err := obj.UnmarshalJSON(raw); err != nil {
		return nil, fmt.Errorf("decoding the object: %w", err)
	}
	return obj, nil
}

// served says which kinds sovrad serves, and what another provider needs.
func served() string {
	return fmt.Sprintf("sovrad serves the infrastructure kinds %s and %s (%s); another provider's kinds need its CRDs installed in this API and its controllers run against it",
		strings.Join(sovraKinds[:len(sovraKinds)-1], ", "), sovraKinds[len(sovraKinds)-1], infrav1.GroupVersion)
}

func notServed(gk schema.GroupKind, why string) string {
	return fmt.Sprintf("kind %s of group %s is not served by this API: %s. %s", gk.Kind, gk.Group, why, served())
}

// misplaced explains where each of sovra's kinds belongs.
func misplaced(p placement, kind string) string {
	where := fmt.Sprintf("%s takes no sovra kind", p.what)
	if p.want != "" {
		where = fmt.Sprintf("%s takes a %s", p.what, p.want)
	}
	return fmt.Sprintf("%s cannot be used here: %s (SovraCluster goes in a Cluster's spec.infrastructureRef, SovraMachine in a Machine's, "+
		"SovraMachineTemplate in the templates of MachineSets, MachineDeployments and TalosControlPlanes)", kind, where)
}

// invalid refuses the request as the API server refuses an invalid object.
func invalid(gk schema.GroupKind, name string, err *field.Error) admission.Response {
	status := apierrors.NewInvalid(gk, name, field.ErrorList{err}).Status()
	return admission.Response{AdmissionResponse: admissionv1.AdmissionResponse{Allowed: false, Result: &status}}
}

// Registration is the ValidatingWebhookConfiguration of the webhook,
// pointing at upstream's webhook Service as the providers' manifests do:
// the webhooks package's Registrar points it at sovrad.
func Registration() *admissionregistrationv1.ValidatingWebhookConfiguration {
	rules := map[string]*admissionregistrationv1.RuleWithOperations{}
	var order []string
	for gk, p := range placements {
		key := gk.Group + "/" + p.version
		r, ok := rules[key]
		if !ok {
			r = &admissionregistrationv1.RuleWithOperations{
				Operations: []admissionregistrationv1.OperationType{admissionregistrationv1.Create, admissionregistrationv1.Update},
				Rule: admissionregistrationv1.Rule{APIGroups: []string{gk.Group}, APIVersions: []string{p.version},
					Scope: ptr.To(admissionregistrationv1.NamespacedScope)},
			}
			rules[key] = r
			order = append(order, key)
		}
		r.Resources = append(r.Resources, p.resource)
	}
	slices.Sort(order)
	var ruleList []admissionregistrationv1.RuleWithOperations
	for _, k := range order {
		slices.Sort(rules[k].Resources)
		ruleList = append(ruleList, *rules[k])
	}
	return &admissionregistrationv1.ValidatingWebhookConfiguration{
		TypeMeta:   metav1.TypeMeta{APIVersion: admissionregistrationv1.SchemeGroupVersion.String(), Kind: "ValidatingWebhookConfiguration"},
		ObjectMeta: metav1.ObjectMeta{Name: ConfigurationName},
		Webhooks: []admissionregistrationv1.ValidatingWebhook{{
			Name: webhookName,
			ClientConfig: admissionregistrationv1.WebhookClientConfig{
				Service: &admissionregistrationv1.ServiceReference{Name: serviceName, Namespace: serviceNamespace, Path: ptr.To(Path)},
			},
			Rules:                   ruleList,
			FailurePolicy:           ptr.To(admissionregistrationv1.Fail),
			MatchPolicy:             ptr.To(admissionregistrationv1.Equivalent),
			SideEffects:             ptr.To(admissionregistrationv1.SideEffectClassNone),
			TimeoutSeconds:          ptr.To(int32(timeoutSeconds)),
			AdmissionReviewVersions: []string{"v1"},
		}},
	}
}
