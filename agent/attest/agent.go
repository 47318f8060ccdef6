package attest

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/google/go-attestation/attest"
	"go.uber.org/zap"

	"github.com/sovra-dev/sovra/internal/claims"
	"github.com/sovra-dev/sovra/internal/nodeapi"
)

// Node describes the machine for enrollment: claims bound to the EK, never
// an identity on their own.
type Node struct {
	UUID      string
	Hostname  string
	Addresses []string
}

// Credential is the node's client certificate from a passing attestation.
type Credential struct {
	Certificate tls.Certificate
	// Leaf is the parsed node certificate.
	Leaf     *x509.Certificate
	Expires  time.Time
	Warnings []string
}

// Agent enrolls the node's TPM and attests its boot. Fields are set before
// first use and not changed after.
type Agent struct {
	TPM    TPM
	Client nodeapi.NodeServiceClient
	Claims Collector
	// EventLogPath is the TCG event log; empty means DefaultEventLogPath.
	EventLogPath string
	Node         Node
	Logger       *zap.Logger

	// mu guards key, node and cred, set by Enroll and Attest.
	mu   sync.Mutex
	key  *Key
	node string
	cred *Credential
}

// ErrNotEnrolled is returned by Attest before a successful Enroll.
var ErrNotEnrolled = errors.New("node is not enrolled")

// Enroll makes a fresh AK and enrolls it: the daemon checks the EK against
// its policy and challenges the AK by credential activation.
func (a *Agent) Enroll(ctx context.Context) error {
	key, err := NewKey(a.TPM)
	if err != nil {
		return fmt.Errorf("enrolling: %w", err)
	}
	stream, err := a.Client.Enroll(ctx)
	if err != nil {
		return fmt.Errorf("enrolling: opening stream: %w", err)
	}
	defer stream.CloseSend()
	begin := key.Begin(a.Node.UUID, a.Node.Hostname, a.Node.Addresses)
	if err := stream.Send(&nodeapi.EnrollRequest{Step: &nodeapi.EnrollRequest_Begin{Begin: begin}}); err != nil {
		return fmt.Errorf("enrolling: sending EK and AK: %w", err)
	}
	resp, err := stream.Recv()
	if err != nil {
		return fmt.Errorf("enrolling: receiving challenge: %w", err)
	}
	ch := resp.GetChallenge()
	if ch == nil {
		return errors.New("enrolling: daemon sent no activation challenge")
	}
	secret, err := key.Activate(a.TPM, ch)
	if err != nil {
		return fmt.Errorf("enrolling: %w", err)
	}
	if err := stream.Send(&nodeapi.EnrollRequest{Step: &nodeapi.EnrollRequest_Proof{Proof: &nodeapi.ActivationProof{Secret: secret}}}); err != nil {
		return fmt.Errorf("enrolling: sending activation proof: %w", err)
	}
	resp, err = stream.Recv()
	if err != nil {
		return fmt.Errorf("enrolling: receiving result: %w", err)
	}
	res := resp.GetResult()
	if res == nil || res.GetNode() == "" {
		return errors.New("enrolling: daemon sent no result")
	}
	a.mu.Lock()
	a.key, a.node = key, res.GetNode()
	a.mu.Unlock()
	a.logger().Info("enrolled", zap.String("node", res.GetNode()), zap.String("ek_hash", res.GetEkHash()))
	return nil
}

// NodeName returns the daemon's name for this node, empty before Enroll.
func (a *Agent) NodeName() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.node
}

// Attest proves this boot: it gets a nonce, collects claims (including the
// hash of a fresh in-memory node key), quotes PCRs with
// extraData = SHA-256(nonce || claims), and sends the quote, PCRs, event log
// and a CSR. A passing attestation returns the node credential.
func (a *Agent) Attest(ctx context.Context) (*Credential, error) {
	a.mu.Lock()
	key, node := a.key, a.node
	a.mu.Unlock()
	if key == nil {
		return nil, ErrNotEnrolled
	}
	nk, err := NewNodeKey()
	if err != nil {
		return nil, fmt.Errorf("attesting: %w", err)
	}
	req, err := a.Evidence(ctx, key, node, nk)
	if err != nil {
		return nil, err
	}
	resp, err := a.Client.Attest(ctx, req)
	if err != nil {
		return nil, fmt.Errorf("attesting: %w", err)
	}
	cred, err := credential(resp, nk)
	if err != nil {
		return nil, fmt.Errorf("attesting: %w", err)
	}
	a.mu.Lock()
	a.cred = cred
	a.mu.Unlock()
	a.logger().Info("attested", zap.String("node", node), zap.Time("credential_expires", cred.Expires), zap.Strings("warnings", cred.Warnings))
	return cred, nil
}

// Evidence builds an attestation request with a fresh nonce from the daemon.
func (a *Agent) Evidence(ctx context.Context, key *Key, node string, nk *NodeKey) (*nodeapi.AttestRequest, error) {
	nr, err := a.Client.GetNonce(ctx, &nodeapi.NonceRequest{Node: node})
	if err != nil {
		return nil, fmt.Errorf("attesting: getting nonce: %w", err)
	}
	return a.EvidenceFor(key, node, nk, nr.GetNonce())
}

// EvidenceFor builds an attestation request for a given nonce: claims with
// the node key's hash, the event log, a quote of QuotedPCRs (SHA-256) with
// extraData = SHA-256(nonce || claims), and a CSR for the node key.
func (a *Agent) EvidenceFor(key *Key, node string, nk *NodeKey, nonce []byte) (*nodeapi.AttestRequest, error) {
	cs := a.Claims.Collect()
	h, err := nk.Hash()
	if err != nil {
		return nil, fmt.Errorf("attesting: %w", err)
	}
	cs.Set(claims.NodeKeySHA256, h)
	enc, err := cs.Encode()
	if err != nil {
		return nil, fmt.Errorf("attesting: %w", err)
	}
	log, err := os.ReadFile(a.eventLogPath())
	if err != nil {
		return nil, fmt.Errorf("attesting: reading event log: %w", err)
	}
	q, err := key.Quote(a.TPM, claims.ExtraData(nonce, enc), attest.HashSHA256, QuotedPCRs)
	if err != nil {
		return nil, fmt.Errorf("attesting: %w", err)
	}
	csr, err := nk.CSR(node)
	if err != nil {
		return nil, fmt.Errorf("attesting: %w", err)
	}
	return Request(node, nonce, enc, q, log, csr), nil
}

// Request assembles an AttestRequest.
func Request(node string, nonce, enc []byte, q *Quote, log, csr []byte) *nodeapi.AttestRequest {
	req := &nodeapi.AttestRequest{
		Node: node, Nonce: nonce, Claims: enc,
		Quote: q.Quote, Signature: q.Signature, PcrHashAlg: uint32(q.Hash),
		EventLog: log, Csr: csr,
	}
	for _, i := range QuotedPCRs {
		if d, ok := q.PCRs[i]; ok {
			req.Pcrs = append(req.Pcrs, &nodeapi.PCRValue{Index: uint32(i), Digest: d})
		}
	}
	return req
}

// Credential returns the node credential of the last passing attestation,
// nil before one.
func (a *Agent) Credential() *Credential {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.cred
}

// ClientCertificate serves the node credential to TLS clients of the
// daemon's other node services (tls.Config.GetClientCertificate). It fails
// until an attestation passed or once the credential expired.
func (a *Agent) ClientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	c := a.Credential()
	if c == nil || !time.Now().Before(c.Expires) {
		return nil, errors.New("no valid node credential: the node has not passed attestation")
	}
	return &c.Certificate, nil
}

// Key returns the enrolled AK, nil before Enroll.
func (a *Agent) Key() *Key {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.key
}

func credential(resp *nodeapi.AttestResponse, nk *NodeKey) (*Credential, error) {
	chain := resp.GetCertificateChain()
	if len(chain) == 0 {
		return nil, errors.New("daemon returned no certificate")
	}
	leaf, err := x509.ParseCertificate(chain[0])
	if err != nil {
		return nil, fmt.Errorf("parsing node certificate: %w", err)
	}
	if pub, ok := leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(&nk.Signer().PublicKey) {
		return nil, errors.New("node certificate is not for the node key")
	}
	return &Credential{
		Certificate: tls.Certificate{Certificate: chain, PrivateKey: nk.Signer(), Leaf: leaf},
		Leaf:        leaf,
		Expires:     leaf.NotAfter,
		Warnings:    resp.GetWarnings(),
	}, nil
}

func (a *Agent) eventLogPath() string { return or(a.EventLogPath, DefaultEventLogPath) }

func (a *Agent) logger() *zap.Logger {
	if a.Logger == nil {
		return zap.NewNop()
	}
	return a.Logger
}
