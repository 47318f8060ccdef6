package capi

import (
	"fmt"

	"github.com/go-logr/zapr"
	"go.uber.org/zap"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	ctrl "sigs.k8s.io/controller-runtime"

	infrav1 "github.com/sovra-dev/sovra/daemon/apis/infrastructure/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/capi/crds"
	"github.com/sovra-dev/sovra/daemon/capi/infra"
	"github.com/sovra-dev/sovra/daemon/hosts"
	"github.com/sovra-dev/sovra/internal/version"
)

// sovraProviderName names sovra's own infrastructure provider among the
// providers whose CRDs Run installs.
const sovraProviderName = "infrastructure-sovra"

// sovraProvider is sovra's infrastructure provider as a crds.Provider: its
// CRDs, applied with the others; it has no webhook registrations of
// upstream's to rewrite.
func sovraProvider() (crds.Provider, error) {
	typed, err := infrav1.CRDs()
	if err != nil {
		return crds.Provider{}, err
	}
	p := crds.Provider{Name: sovraProviderName, Module: "github.com/sovra-dev/sovra@" + version.Version}
	for _, crd := range typed {
		obj, err := runtime.DefaultUnstructuredConverter.ToUnstructured(crd)
		if err != nil {
			return p, fmt.Errorf("converting CRD %s: %w", crd.Name, err)
		}
		u := &unstructured.Unstructured{Object: obj}
		u.SetAPIVersion("apiextensions.k8s.io/v1")
		u.SetKind("CustomResourceDefinition")
		unstructured.RemoveNestedField(u.Object, "status")
		unstructured.RemoveNestedField(u.Object, "metadata", "creationTimestamp")
		p.CRDs = append(p.CRDs, u)
	}
	return p, nil
}

// setupSovra registers sovra's infrastructure provider (SovraCluster,
// SovraMachine) and the host pool's reconciler, each with the manager's event
// recorder under its own name.
func setupSovra(mgr ctrl.Manager, log *zap.Logger) error {
	clusterLog := zapr.NewLogger(log.Named("sovracluster"))
	if err := (&infra.ClusterReconciler{Client: mgr.GetClient()}).SetupWithManager(mgr, clusterLog); err != nil {
		return err
	}
	if err := (&infra.MachineReconciler{
		Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(),
		Events: mgr.GetEventRecorderFor("sovra-infrastructure"), Logger: log.Named("sovramachine"),
	}).SetupWithManager(mgr, zapr.NewLogger(log.Named("sovramachine"))); err != nil {
		return err
	}
	return (&hosts.Reconciler{Client: mgr.GetClient(), Events: mgr.GetEventRecorderFor("sovra-hosts"), Logger: log.Named("hosts")}).SetupWithManager(mgr)
}
