package kubecontrollers

import (
	"context"

	"k8s.io/kubernetes/pkg/controller/clusterroleaggregation"

	"github.com/sovra-dev/sovra/daemon/capi/controllers"
)

const (
	aggregationAgent = "clusterrole-aggregation-controller"
	// aggregationWorkers is kube-controller-manager's.
	aggregationWorkers = 5
)

// clusterRoleAggregation fills ClusterRoles that aggregate others by label:
// the built-in admin, edit and view roles, and any an operator defines.
var clusterRoleAggregation = controller{name: controllers.ClusterRoleAggregation, start: startClusterRoleAggregation}

func startClusterRoleAggregation(ctx context.Context, cc *controllerContext) error {
	kube, err := cc.client(aggregationAgent)
	if err != nil {
		return err
	}
	c := clusterroleaggregation.NewClusterRoleAggregation(cc.informers.Rbac().V1().ClusterRoles(), kube.RbacV1())
	go c.Run(ctx, aggregationWorkers)
	return nil
}
