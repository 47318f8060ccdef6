package capi

import (
	bootstrapv1alpha2 "github.com/siderolabs/cluster-api-bootstrap-provider-talos/api/v1alpha2"
	bootstrapv1alpha3 "github.com/siderolabs/cluster-api-bootstrap-provider-talos/api/v1alpha3"
	controlplanev1alpha3 "github.com/siderolabs/cluster-api-control-plane-provider-talos/api/v1alpha3"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apimachinery/pkg/runtime"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	addonsv1 "sigs.k8s.io/cluster-api/api/addons/v1beta1"
	clusterv1 "sigs.k8s.io/cluster-api/api/v1beta1"
	expv1 "sigs.k8s.io/cluster-api/exp/api/v1beta1"
	ipamv1 "sigs.k8s.io/cluster-api/exp/ipam/api/v1beta1"

	infrav1 "github.com/sovra-dev/sovra/daemon/apis/infrastructure/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
)

// NewScheme returns the types the manager works with: Kubernetes' own, CRDs,
// Cluster API core, the Talos providers (every version they serve, so
// that the conversion webhook can convert between them), sovra's
// infrastructure provider and sovra's own types (hosts, nodes).
func NewScheme() *runtime.Scheme {
	s := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{
		clientgoscheme.AddToScheme,
		apiextensionsv1.AddToScheme,
		clusterv1.AddToScheme,
		expv1.AddToScheme,
		addonsv1.AddToScheme,
		ipamv1.AddToScheme,
		bootstrapv1alpha2.AddToScheme,
		bootstrapv1alpha3.AddToScheme,
		controlplanev1alpha3.AddToScheme,
		infrav1.AddToScheme,
		v1alpha1.AddToScheme,
	} {
		utilruntime.Must(add(s))
	}
	return s
}
