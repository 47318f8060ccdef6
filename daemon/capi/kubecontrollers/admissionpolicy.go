package kubecontrollers

import (
	"context"
	"fmt"

	apiextensionsscheme "k8s.io/apiextensions-apiserver/pkg/client/clientset/clientset/scheme"
	validatingadmissionpolicy "k8s.io/apiserver/pkg/admission/plugin/policy/validating"
	"k8s.io/apiserver/pkg/cel/openapi/resolver"
	k8sscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/kubernetes/pkg/controller/validatingadmissionpolicystatus"
	"k8s.io/kubernetes/pkg/generated/openapi"

	"github.com/sovra-dev/sovra/daemon/capi/controllers"
)

const (
	admissionPolicyAgent = "validatingadmissionpolicy-status-controller"
	// admissionPolicyWorkers is kube-controller-manager's
	// --concurrent-validating-admission-policy-status-syncs.
	admissionPolicyWorkers = 5
)

// admissionPolicyStatus type-checks ValidatingAdmissionPolicies and writes
// the warnings into their status, as kubectl shows them.
var admissionPolicyStatus = controller{name: controllers.ValidatingAdmissionPolicyStatus, start: startAdmissionPolicyStatus}

func startAdmissionPolicyStatus(ctx context.Context, cc *controllerContext) error {
	kube, err := cc.client(admissionPolicyAgent)
	if err != nil {
		return err
	}
	schemas := resolver.NewDefinitionsSchemaResolver(openapi.GetOpenAPIDefinitions, k8sscheme.Scheme, apiextensionsscheme.Scheme).
		Combine(&resolver.ClientDiscoveryResolver{Discovery: kube.Discovery()})
	c, err := validatingadmissionpolicystatus.NewController(
		cc.informers.Admissionregistration().V1().ValidatingAdmissionPolicies(),
		kube.AdmissionregistrationV1().ValidatingAdmissionPolicies(),
		&validatingadmissionpolicy.TypeChecker{SchemaResolver: schemas, RestMapper: cc.mapper})
	if err != nil {
		return fmt.Errorf("creating the ValidatingAdmissionPolicy status controller: %w", err)
	}
	go c.Run(ctx, admissionPolicyWorkers)
	return nil
}
