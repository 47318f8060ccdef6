package kubecontrollers

import (
	"context"
	"errors"
	"fmt"

	"k8s.io/kubernetes/pkg/controller/certificates/rootcacertpublisher"

	"github.com/sovra-dev/sovra/daemon/capi/controllers"
)

const (
	rootCAAgent = "root-ca-cert-publisher"
	// rootCAWorkers is kube-controller-manager's.
	rootCAWorkers = 1
)

// rootCACertPublisher keeps the kube-root-ca.crt ConfigMap, the CA bundle
// that verifies the API, in every namespace.
var rootCACertPublisher = controller{name: controllers.RootCACertPublisher, start: startRootCACertPublisher}

func startRootCACertPublisher(ctx context.Context, cc *controllerContext) error {
	if len(cc.rootCA) == 0 {
		return errors.New("no CA bundle to publish")
	}
	kube, err := cc.client(rootCAAgent)
	if err != nil {
		return err
	}
	c, err := rootcacertpublisher.NewPublisher(cc.informers.Core().V1().ConfigMaps(), cc.informers.Core().V1().Namespaces(), kube, cc.rootCA)
	if err != nil {
		return fmt.Errorf("creating the root CA publisher: %w", err)
	}
	go c.Run(ctx, rootCAWorkers)
	return nil
}
