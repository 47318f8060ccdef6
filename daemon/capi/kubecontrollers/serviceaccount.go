package kubecontrollers

import (
	"context"
	"fmt"

	serviceaccountcontroller "k8s.io/kubernetes/pkg/controller/serviceaccount"

	"github.com/sovra-dev/sovra/daemon/capi/controllers"
)

const (
	serviceAccountAgent = "service-account-controller"
	// serviceAccountWorkers is kube-controller-manager's.
	serviceAccountWorkers = 1
)

// serviceAccounts creates the default ServiceAccount in every namespace.
var serviceAccounts = controller{name: controllers.ServiceAccount, start: startServiceAccounts}

func startServiceAccounts(ctx context.Context, cc *controllerContext) error {
	kube, err := cc.client(serviceAccountAgent)
	if err != nil {
		return err
	}
	c, err := serviceaccountcontroller.NewServiceAccountsController(
		cc.informers.Core().V1().ServiceAccounts(), cc.informers.Core().V1().Namespaces(),
		kube, serviceaccountcontroller.DefaultServiceAccountsControllerOptions())
	if err != nil {
		return fmt.Errorf("creating the ServiceAccount controller: %w", err)
	}
	go c.Run(ctx, serviceAccountWorkers)
	return nil
}
