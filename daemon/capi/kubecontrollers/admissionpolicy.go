package kubecontrollers

import (
	"context"
	"fmt"

	validatingadmissionpolicy "k8s.io/apiserver/pkg/admission/plugin/policy/validating"
	"k8s.io/apiserver/pkg/cel/openapi/resolver"
	"k8s.io/kubernetes/pkg/controller/validatingadmissionpolicystatus"

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

// startAdmissionPolicyStatus resolves the schemas of the types a policy
// matches from the API's own OpenAPI v3 documents, built-in types and CRDs
// alike, when it checks a policy. kube-controller-manager resolves built-in
// types from the compiled-in OpenAPI definitions of every Kubernetes type
// instead; holding those costs about 6 MB of heap for the life of the
// process (12 MB of resident memory at the default GOGC), for a check that
// runs only when a policy changes (tests/daemon BenchmarkDaemon).
func startAdmissionPolicyStatus(ctx context.Context, cc *controllerContext) error {
	kube, err := cc.client(admissionPolicyAgent)
	if err != nil {
		return err
	}
	schemas := &resolver.ClientDiscoveryResolver{Discovery: kube.Discovery()}
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
