package kubecontrollers

import (
	"context"

	"k8s.io/kubernetes/pkg/controller/certificates/cleaner"

	"github.com/sovra-dev/sovra/daemon/capi/controllers"
)

const (
	csrCleanerAgent = "certificatesigningrequest-cleaner"
	// csrCleanerWorkers is kube-controller-manager's.
	csrCleanerWorkers = 1
)

// csrCleaner deletes CertificateSigningRequests past upstream's deadlines
// (pending a day, decided an hour, or their certificate expired): sovrad
// signs none, so nothing else would.
var csrCleaner = controller{name: controllers.CSRCleaner, start: startCSRCleaner}

func startCSRCleaner(ctx context.Context, cc *controllerContext) error {
	kube, err := cc.client(csrCleanerAgent)
	if err != nil {
		return err
	}
	c := cleaner.NewCSRCleanerController(kube.CertificatesV1().CertificateSigningRequests(),
		cc.informers.Certificates().V1().CertificateSigningRequests())
	go c.Run(ctx, csrCleanerWorkers)
	return nil
}
