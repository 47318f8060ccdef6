package fence

import (
	"time"

	controlplanev1 "github.com/siderolabs/cluster-api-control-plane-provider-talos/api/v1alpha3"
	cacppt "github.com/siderolabs/cluster-api-control-plane-provider-talos/controllers"
	"go.uber.org/zap"
	clusterv1 "sigs.k8s.io/cluster-api/api/v1beta1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/handler"
)

// Setup registers CACPPT's reconciler r behind the gate, with the watches of
// its own SetupWithManager, and the fence controller with mgr. It wraps r's
// Client and APIReader. grace is the fence controller's Grace.
func Setup(mgr ctrl.Manager, r *cacppt.TalosControlPlaneReconciler, leases Leases, grace time.Duration, opts controller.Options, log *zap.Logger) error {
	g := &Gate{Leases: leases, Log: log}
	r.Client = g.Client(r.Client)
	r.APIReader = g.Reader(r.APIReader)
	if err := ctrl.NewControllerManagedBy(mgr).
		For(&controlplanev1.TalosControlPlane{}).
		Owns(&clusterv1.Machine{}).
		Watches(&clusterv1.Cluster{}, handler.EnqueueRequestsFromMapFunc(r.ClusterToTalosControlPlane)).
		WithOptions(opts).
		Complete(g.Reconciler(r)); err != nil {
		return err
	}
	return (&Controller{
		Client: mgr.GetClient(), Leases: leases, Grace: grace, Log: log,
		Events: mgr.GetEventRecorderFor("sovra-bootstrap-fence"),
	}).SetupWithManager(mgr)
}
