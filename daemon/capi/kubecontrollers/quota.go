package kubecontrollers

import (
	"context"
	"fmt"
	"time"

	quotageneric "k8s.io/apiserver/pkg/quota/v1/generic"
	kubecontroller "k8s.io/kubernetes/pkg/controller"
	resourcequotacontroller "k8s.io/kubernetes/pkg/controller/resourcequota"
	quotainstall "k8s.io/kubernetes/pkg/quota/v1/install"

	"github.com/sovra-dev/sovra/daemon/capi/controllers"
)

const (
	quotaAgent = "resourcequota-controller"
	// quotaSyncPeriod and quotaWorkers are kube-controller-manager's
	// --resource-quota-sync-period and --concurrent-resource-quota-syncs.
	quotaSyncPeriod = 5 * time.Minute
	quotaWorkers    = 5
)

// resourceQuota computes ResourceQuotas' usage. The quota admission plugin
// refuses what a quota governs until the controller has written its status,
// so without it one ResourceQuota blocks its namespace.
var resourceQuota = controller{name: controllers.ResourceQuota, start: startResourceQuota}

func startResourceQuota(ctx context.Context, cc *controllerContext) error {
	kube, err := cc.client(quotaAgent)
	if err != nil {
		return err
	}
	discover := kube.Discovery().ServerPreferredNamespacedResources
	config := quotainstall.NewQuotaConfigurationForControllers(quotageneric.ListerFuncForResourceFunc(cc.informers.ForResource))
	c, err := resourcequotacontroller.NewController(ctx, &resourcequotacontroller.ControllerOptions{
		QuotaClient:               kube.CoreV1(),
		ResourceQuotaInformer:     cc.informers.Core().V1().ResourceQuotas(),
		ResyncPeriod:              kubecontroller.StaticResyncPeriodFunc(quotaSyncPeriod),
		InformerFactory:           cc.objectOrMetadata,
		ReplenishmentResyncPeriod: kubecontroller.StaticResyncPeriodFunc(minResyncPeriod),
		DiscoveryFunc:             discover,
		IgnoredResourcesFunc:      config.IgnoredResources,
		InformersStarted:          cc.informersStarted,
		Registry:                  quotageneric.NewRegistry(config.Evaluators()),
		UpdateFilter:              quotainstall.DefaultUpdateFilter(),
	})
	if err != nil {
		return fmt.Errorf("creating the ResourceQuota controller: %w", err)
	}
	go c.Run(ctx, quotaWorkers)
	go c.Sync(ctx, discover, discoverySyncPeriod)
	return nil
}
