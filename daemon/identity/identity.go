// Package identity gives each of sovrad's in-process components a user of
// its own in the Kubernetes API, so that the audit log says which component
// changed what and no component can do more than its part: a client
// certificate from the daemon's CA, issued in memory at every start and never
// written to disk, and the RBAC that grants the user what the component needs
// (rbac.go), which sovrad ensures at start with the API server's loopback
// superuser. Only such bootstrap steps (installing CRDs, ensuring this RBAC)
// act as the superuser.
package identity

import (
	"crypto/x509"
	"fmt"

	"k8s.io/client-go/rest"

	"github.com/sovra-dev/sovra/daemon/pki"
)

// The components' users. Each is in Group too.
const (
	// CAPI runs Cluster API and the Talos providers: their controllers,
	// their webhooks' registration and the bootstrap fence.
	CAPI = "system:sovra:capi"
	// KMS is the Talos KMS and the volume key service.
	KMS = "system:sovra:kms"
	// NodeAPI is the node API: enrollment, attestation, membership and the
	// check of node credentials.
	NodeAPI = "system:sovra:nodeapi"
	// Shred scrubs revoked nodes' key salts.
	Shred = "system:sovra:shred"
	// Controllers runs the upstream kube-controller-manager controllers
	// (package kubecontrollers).
	Controllers = "system:sovra:controllers"
	// Hosts is the host pool: the metadata service the agents sync with
	// (on the node API) and the reconciler of the Hosts' phases.
	Hosts = "system:sovra:hosts"
	// Infrastructure is sovra's Cluster API infrastructure provider: the
	// SovraCluster and SovraMachine reconcilers, which claim and release
	// hosts.
	Infrastructure = "system:sovra:infrastructure"

	// Group holds every component's user; the default audit policy does not
	// record the components' reads.
	Group = "system:sovra:components"
)

// Users lists the components' users.
var Users = []string{CAPI, KMS, NodeAPI, Shred, Controllers, Hosts, Infrastructure}

// Clients are the client configurations of every component, for the
// daemon's API.
type Clients struct {
	CAPI, KMS, NodeAPI, Shred, Controllers, Hosts, Infrastructure *rest.Config
}

// NewClients issues every component's credential with ca and returns
// configurations that reach the server as loopback does (its address, its
// trust) but authenticate as the component.
func NewClients(loopback *rest.Config, ca *pki.CA) (*Clients, error) {
	var c Clients
	for _, out := range []struct {
		user string
		to   **rest.Config
	}{{CAPI, &c.CAPI}, {KMS, &c.KMS}, {NodeAPI, &c.NodeAPI}, {Shred, &c.Shred}, {Controllers, &c.Controllers},
		{Hosts, &c.Hosts}, {Infrastructure, &c.Infrastructure}} {
		cfg, err := ClientConfig(loopback, ca, out.user)
		if err != nil {
			return nil, err
		}
		*out.to = cfg
	}
	return &c, nil
}

// ClientConfig returns loopback with its token replaced by a client
// certificate for user (in Group), issued by ca. The API server trusts ca
// for client certificates (--client-ca-file).
func ClientConfig(loopback *rest.Config, ca *pki.CA, user string) (*rest.Config, error) {
	cert, key, err := ca.Issue(pki.Leaf{
		CommonName:   user,
		Organization: []string{Group},
		Usage:        []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	if err != nil {
		return nil, fmt.Errorf("issuing the credential of %s: %w", user, err)
	}
	cfg := rest.CopyConfig(loopback)
	cfg.BearerToken, cfg.BearerTokenFile = "", ""
	cfg.TLSClientConfig.CertData, cfg.TLSClientConfig.KeyData = cert, key
	cfg.TLSClientConfig.CertFile, cfg.TLSClientConfig.KeyFile = "", ""
	return cfg, nil
}
