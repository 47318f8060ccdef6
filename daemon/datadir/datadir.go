// Package datadir lays out sovrad's data directory: on first start it creates
// the directory (mode 0700) and everything the API server needs in it; on later
// starts it reuses what is there and only reissues what no longer fits (a
// serving certificate missing a new --tls-san, say).
package datadir

import (
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"

	"go.uber.org/zap"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/sovra-dev/sovra/daemon/config"
	"github.com/sovra-dev/sovra/daemon/pki"
)

// File names in the data directory, besides those of package pki.
const (
	AdminKubeconfig  = "admin.kubeconfig"
	EncryptionConfig = "encryption-config.yaml"
	AuditPolicy      = "audit-policy.yaml"
	AuditLog         = "audit.log"
	AuthnConfig      = "authentication-config.yaml"
	SQLiteDir        = "db"
	// NodeCACert is the CA bundle nodes verify the node API with; the same
	// CA signs node credentials. It is not the API's CA: a node credential
	// must never log in to the Kubernetes API.
	NodeCACert            = "node-ca.crt"
	NodeCAKey             = "node-ca.key"
	NodeServeCert         = "node-api.crt"
	NodeServeKey          = "node-api.key"
	nodeCACommonName      = "sovra-node-ca"
	nodeServingCommonName = "sovrad-node-api"

	dirMode            = 0o700
	encryptionKeyBytes = 32
	caCommonName       = "sovra-ca"
	servingCommonName  = "sovrad"
	kubeconfigContext  = "sovra"
)

// Files are the paths the API server is configured with.
type Files struct {
	Dir              string
	CA               *pki.CA
	CACert           string
	ServingCert      string
	ServingKey       string
	SAKey            string
	SAPub            string
	AdminKubeconfig  string
	EncryptionConfig string
	AuditPolicy      string
	// AuditLog is a path, or "-" for stdout.
	AuditLog    string
	AuthnConfig string
	// ServerURL is the API's URL as written into admin.kubeconfig.
	ServerURL string
	// AdvertiseIP is the address the API is advertised on.
	AdvertiseIP net.IP

	// NodeAdvertiseIP is the address the node API is advertised on: it is
	// in the node API's serving certificate.
	NodeAdvertiseIP net.IP

	// NodeCA signs the node API's serving certificate and node credentials.
	NodeCA                          *pki.CA
	NodeCACert                      string
	NodeServingCert, NodeServingKey string
}

// Prepare creates or reuses the data directory of cfg, which must have passed
// Validate, and returns the paths of its files.
func Prepare(cfg *config.Config, log *zap.Logger) (*Files, error) {
	dir, err := filepath.Abs(cfg.DataDir)
	if err != nil {
		return nil, fmt.Errorf("resolving data directory: %w", err)
	}
	if err := os.MkdirAll(dir, dirMode); err != nil {
		return nil, fmt.Errorf("creating data directory: %w", err)
	}
	if err := os.Chmod(dir, dirMode); err != nil {
		return nil, fmt.Errorf("securing data directory: %w", err)
	}
	f := &Files{
		Dir:              dir,
		CACert:           filepath.Join(dir, pki.CACert),
		ServingCert:      filepath.Join(dir, pki.ServingCert),
		ServingKey:       filepath.Join(dir, pki.ServingKey),
		SAKey:            filepath.Join(dir, pki.SAKey),
		SAPub:            filepath.Join(dir, pki.SAPub),
		AdminKubeconfig:  filepath.Join(dir, AdminKubeconfig),
		EncryptionConfig: filepath.Join(dir, EncryptionConfig),
		AuditPolicy:      cfg.AuditPolicy,
		AuditLog:         cfg.AuditLog,
		AuthnConfig:      filepath.Join(dir, AuthnConfig),
	}
	if f.AuditLog == "" {
		f.AuditLog = filepath.Join(dir, AuditLog)
	}

	if f.CA, err = pki.EnsureCA(dir, caCommonName); err != nil {
		return nil, err
	}
	listenIP, port, err := cfg.ListenHostPort()
	if err != nil {
		return nil, err
	}
	f.AdvertiseIP = advertiseIP(cfg.AdvertiseAddress, listenIP)
	clientIP := listenIP
	if clientIP.IsUnspecified() {
		clientIP = f.AdvertiseIP
	}
	f.ServerURL = (&url.URL{Scheme: "https", Host: net.JoinHostPort(clientIP.String(), strconv.Itoa(port))}).String()

	serving := servingLeaf(cfg.TLSSANs, listenIP, f.AdvertiseIP)
	if issued, err := f.CA.EnsureLeaf(f.ServingCert, f.ServingKey, serving); err != nil {
		return nil, err
	} else if issued {
		log.Info("issued API serving certificate", zap.Strings("dns", serving.DNSNames), zap.Stringers("ips", serving.IPs))
	}
	f.NodeCACert = filepath.Join(dir, NodeCACert)
	f.NodeServingCert, f.NodeServingKey = filepath.Join(dir, NodeServeCert), filepath.Join(dir, NodeServeKey)
	if f.NodeCA, err = pki.EnsureCAFiles(f.NodeCACert, filepath.Join(dir, NodeCAKey), nodeCACommonName); err != nil {
		return nil, err
	}
	f.NodeAdvertiseIP = advertiseIP(cfg.AdvertiseAddress, nodeListenIP(cfg))
	nodeServing := nodeServingLeaf(cfg, serving, f.NodeAdvertiseIP)
	if issued, err := f.NodeCA.EnsureLeaf(f.NodeServingCert, f.NodeServingKey, nodeServing); err != nil {
		return nil, err
	} else if issued {
		log.Info("issued node API serving certificate", zap.Strings("dns", nodeServing.DNSNames), zap.Stringers("ips", nodeServing.IPs))
	}
	if err := pki.EnsureKey(f.SAKey, f.SAPub); err != nil {
		return nil, err
	}
	adminCert, adminKey := filepath.Join(dir, pki.AdminCert), filepath.Join(dir, pki.AdminKey)
	if _, err := f.CA.EnsureLeaf(adminCert, adminKey, pki.Leaf{
		CommonName:   pki.AdminUser,
		Organization: []string{pki.AdminGroup},
		Usage:        []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}); err != nil {
		return nil, err
	}
	if err := writeKubeconfig(f, adminCert, adminKey); err != nil {
		return nil, err
	}
	if err := ensureEncryptionConfig(f.EncryptionConfig); err != nil {
		return nil, err
	}
	if f.AuditPolicy == "" {
		f.AuditPolicy = filepath.Join(dir, AuditPolicy)
		if err := pki.WriteFile(f.AuditPolicy, []byte(defaultAuditPolicy), 0o644); err != nil {
			return nil, err
		}
	}
	authn, err := authenticationConfig(cfg.OIDC)
	if err != nil {
		return nil, err
	}
	if err := pki.WriteFile(f.AuthnConfig, authn, 0o600); err != nil {
		return nil, err
	}
	return f, nil
}

func servingLeaf(sans []string, listen, advertise net.IP) pki.Leaf {
	leaf := pki.Leaf{
		CommonName: servingCommonName,
		DNSNames:   []string{"localhost"},
		IPs:        []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		Usage:      []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if !listen.IsUnspecified() {
		leaf.Add(listen.String())
	}
	leaf.Add(advertise.String())
	for _, san := range sans {
		leaf.Add(san)
	}
	return leaf
}

// nodeServingLeaf is the node API's certificate, which the KMS serves too:
// the names of the API's certificate (loopback and --tls-san), the address
// nodes are told to reach the daemon on, the hosts of the node API and KMS
// listeners where they are specific, and --node-tls-san.
func nodeServingLeaf(cfg *config.Config, api pki.Leaf, advertise net.IP) pki.Leaf {
	leaf := pki.Leaf{
		CommonName: nodeServingCommonName,
		DNSNames:   slices.Clone(api.DNSNames),
		IPs:        slices.Clone(api.IPs),
		Usage:      api.Usage,
	}
	leaf.Add(advertise.String())
	for _, addr := range []string{cfg.NodeAPI.Listen, cfg.KMS.Listen} {
		if host, _, err := net.SplitHostPort(addr); err == nil && host != "" {
			if ip := net.ParseIP(host); ip == nil || !ip.IsUnspecified() {
				leaf.Add(host)
			}
		}
	}
	for _, san := range cfg.NodeAPI.TLSSANs {
		leaf.Add(san)
	}
	return leaf
}

// nodeListenIP is the address the node API listens on (the KMS's when it
// has a listener of its own and the node API is off); unspecified when it
// listens on every interface or on a name.
func nodeListenIP(cfg *config.Config) net.IP {
	addr := cfg.NodeAPI.Listen
	if addr == "" {
		addr = cfg.KMS.Listen
	}
	host, _, err := net.SplitHostPort(addr)
	if ip := net.ParseIP(host); err == nil && ip != nil {
		return ip
	}
	return net.IPv4zero
}

// advertiseIP is the configured address, else the listen address when it is
// specific, else the host's first global unicast address, else loopback.
func advertiseIP(configured string, listen net.IP) net.IP {
	if ip := net.ParseIP(configured); ip != nil {
		return ip
	}
	if !listen.IsUnspecified() {
		return listen
	}
	addrs, _ := net.InterfaceAddrs()
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && n.IP.IsGlobalUnicast() && n.IP.To4() != nil {
			return n.IP
		}
	}
	return net.IPv4(127, 0, 0, 1)
}

func writeKubeconfig(f *Files, certPath, keyPath string) error {
	cert, err := os.ReadFile(certPath)
	if err != nil {
		return fmt.Errorf("reading admin certificate: %w", err)
	}
	key, err := os.ReadFile(keyPath)
	if err != nil {
		return fmt.Errorf("reading admin key: %w", err)
	}
	kc := clientcmdapi.NewConfig()
	kc.Clusters[kubeconfigContext] = &clientcmdapi.Cluster{Server: f.ServerURL, CertificateAuthorityData: f.CA.PEM}
	kc.AuthInfos[pki.AdminUser] = &clientcmdapi.AuthInfo{ClientCertificateData: cert, ClientKeyData: key}
	kc.Contexts[kubeconfigContext] = &clientcmdapi.Context{Cluster: kubeconfigContext, AuthInfo: pki.AdminUser}
	kc.CurrentContext = kubeconfigContext
	data, err := clientcmd.Write(*kc)
	if err != nil {
		return fmt.Errorf("encoding admin kubeconfig: %w", err)
	}
	return pki.WriteFile(f.AdminKubeconfig, data, 0o600)
}

// ensureEncryptionConfig writes, once, an EncryptionConfiguration that
// encrypts Secrets with secretbox (XSalsa20-Poly1305) under a generated key.
// The identity provider comes last, for reads only.
func ensureEncryptionConfig(path string) error {
	if _, err := os.Stat(path); err == nil {
		return nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("reading encryption configuration: %w", err)
	}
	key := make([]byte, encryptionKeyBytes)
	if _, err := rand.Read(key); err != nil {
		return fmt.Errorf("generating encryption key: %w", err)
	}
	doc := fmt.Sprintf(`apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: ["secrets"]
    providers:
      - secretbox:
          keys:
            - name: key1
              secret: %s
      - identity: {}
`, base64.StdEncoding.EncodeToString(key))
	return pki.WriteFile(path, []byte(doc), 0o600)
}
