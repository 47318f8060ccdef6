package attest

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	goattest "github.com/google/go-attestation/attest"
	"github.com/google/go-tpm/legacy/tpm2"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	agentattest "github.com/sovra-dev/sovra/agent/attest"
	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/attestation"
	"github.com/sovra-dev/sovra/internal/claims"
	pb "github.com/sovra-dev/sovra/internal/nodeapi"
	"github.com/sovra-dev/sovra/internal/tcglog"
	"github.com/sovra-dev/sovra/internal/testutil"
	"github.com/sovra-dev/sovra/tests/swtpmlab"
)

// attackerUUID is the SMBIOS UUID the attacks claim.
const attackerUUID = "0badc0de-0000-4000-8000-000000000000"

// otherNode is the record of another machine of the fleet.
const otherNode = "ek-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"

// story is one run of enroll, attest and the attacks against a lab.
type story struct {
	t     *testing.T
	lab   lab
	d     *daemon
	a     *agentattest.Agent
	other *agentattest.Key // an AK in TPM 1, made on demand
}

func runStory(t *testing.T, l lab) {
	ctx := context.Background()
	d := startDaemon(t, l.ekPolicy(t))
	tpm, log := l.use(t, 0)
	a := &agentattest.Agent{
		TPM: tpm, Client: d.api, Claims: swtpmlab.NodeRoot(t), EventLogPath: log,
		Node:   agentattest.Node{UUID: newUUID(), Hostname: "cp-1", Addresses: []string{"10.5.0.2"}},
		Logger: zaptest.NewLogger(t),
	}
	s := &story{t: t, lab: l, d: d, a: a}

	if err := a.Enroll(ctx); err != nil {
		t.Fatalf("enroll: %v", err)
	}
	cred, err := a.Attest(ctx)
	if err != nil {
		t.Fatalf("attest: %v", err)
	}
	n := s.node(a.NodeName())
	if c := meta.FindStatusCondition(n.Status.Conditions, v1alpha1.ConditionAttested); c == nil || c.Status != metav1.ConditionTrue {
		t.Fatalf("node not Attested after a passing attestation: %+v", n.Status)
	}
	wantMethod := "AllowList"
	if l.ekCertificates() {
		wantMethod = "Certificate"
	}
	if n.Status.EnrollmentMethod != wantMethod || n.Status.LastAttestationResult != v1alpha1.ResultPassed {
		t.Fatalf("status = %s/%s, want %s/Passed", n.Status.EnrollmentMethod, n.Status.LastAttestationResult, wantMethod)
	}
	if n.Status.Claims[claims.SecureBoot] != "enabled" || n.Status.Claims[claims.TalosVersion] != "v1.13.0" {
		t.Errorf("claims in status = %v", n.Status.Claims)
	}
	roots := x509.NewCertPool()
	roots.AddCert(d.nodeCA)
	if _, err := cred.Leaf.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatalf("node certificate does not verify as a client certificate: %v", err)
	}
	if cred.Leaf.Subject.CommonName != a.NodeName() || time.Until(cred.Expires) > attestation.DefaultCertTTL+time.Minute {
		t.Fatalf("node certificate for %q until %v", cred.Leaf.Subject.CommonName, cred.Expires)
	}
	t.Logf("enrolled and attested %s (%s, %s)", n.Name, n.Status.EnrollmentMethod, n.Status.LastAttestationResult)

	// A second node of the fleet, whose nonces node A must not use.
	other := &v1alpha1.SovraNode{ObjectMeta: metav1.ObjectMeta{Name: otherNode},
		Spec: v1alpha1.SovraNodeSpec{EKHash: strings.Repeat("b", 64), EKPublic: []byte{1}, AKPublic: []byte{1}}}
	if err := d.store.CreateNode(ctx, other); err != nil && !errors.Is(err, attestation.ErrConflict) {
		t.Fatal(err)
	}

	s.attacks()

	if _, err := a.Attest(ctx); err != nil {
		t.Fatalf("attest after the attacks: %v", err)
	}
	if kc := os.Getenv(kubeconfigEnv); kc != "" {
		out, err := exec.Command(testutil.Bin(t, "kubectl"), "--kubeconfig", kc, "get", "sovranodes", a.NodeName()).CombinedOutput()
		if err != nil {
			t.Fatalf("kubectl get sovranodes: %v\n%s", err, out)
		}
		t.Logf("kubectl get sovranodes:\n%s", out)
		if !strings.Contains(string(out), "True") || !strings.Contains(string(out), v1alpha1.ResultPassed) {
			t.Fatalf("kubectl does not show the node Attested")
		}
	}
}

// attack is one attempt that must be refused.
type attack struct {
	name string
	// code and reason are what the refusal must carry.
	code   codes.Code
	reason string
	run    func(*story) error
	// authenticated attacks present evidence the node's own TPM signed:
	// they leave the node not attested instead of leaving it unchanged.
	authenticated string
	// selfChecked attacks compare the records themselves (around the
	// attacking step only).
	selfChecked bool
}

func (s *story) attacks() {
	attacks := []attack{
		{name: "replayed nonce", code: codes.FailedPrecondition, reason: "already used", run: (*story).replayedNonce, selfChecked: true},
		{name: "expired nonce", code: codes.FailedPrecondition, reason: "expired", run: (*story).expiredNonce},
		{name: "nonce of another node", code: codes.FailedPrecondition, reason: "issued to another node", run: (*story).otherNodesNonce},
		{name: "quote signed by a software key", code: codes.PermissionDenied, reason: "signature does not verify with the pinned AK", run: (*story).softwareQuote},
		{name: "enrollment of a software AK that was never activated", code: codes.PermissionDenied, reason: "credential activation failed", run: (*story).softwareAK},
		{name: "AK from another TPM presented with this EK", code: codes.PermissionDenied, reason: "credential activation failed", run: (*story).otherTPMsAK},
		{name: "EK not allowed", code: codes.PermissionDenied, reason: "not allowed by the enrollment policy", run: (*story).ekNotAllowed},
		{name: "EK certificate with a broken chain", code: codes.PermissionDenied, reason: "does not chain to a configured manufacturer root", run: (*story).ekBrokenChain},
		{name: "PCR value violating an Enforce policy", code: codes.PermissionDenied, reason: "policy violated", run: (*story).pcrPolicy, authenticated: v1alpha1.ReasonPolicyViolation},
		{name: "tampered event log", code: codes.PermissionDenied, reason: "event log does not replay", run: (*story).tamperedLog, authenticated: v1alpha1.ReasonEventLogMismatch},
		{name: "empty event log", code: codes.InvalidArgument, reason: "event log of 0 bytes", run: (*story).emptyLog},
		{name: "claim altered after quoting", code: codes.PermissionDenied, reason: "extraData does not match", run: (*story).alteredClaim},
		{name: "malformed claims", code: codes.InvalidArgument, reason: "malformed claims", run: (*story).malformedClaims},
		{name: "malformed quote", code: codes.PermissionDenied, reason: "signature does not verify", run: (*story).malformedQuote},
		{name: "malformed signature", code: codes.InvalidArgument, reason: "decoding signature", run: (*story).malformedSignature},
		{name: "malformed EK", code: codes.InvalidArgument, reason: "malformed EK", run: (*story).malformedEK},
		{name: "oversized message", code: codes.ResourceExhausted, reason: "larger than max", run: (*story).oversizedMessage},
		{name: "oversized event log", code: codes.InvalidArgument, reason: "event log of", run: (*story).oversizedLog},
		{name: "quote in the SHA-1 bank", code: codes.PermissionDenied, reason: "unaccepted hash algorithm", run: (*story).sha1Quote},
		{name: "quote over too few PCRs", code: codes.PermissionDenied, reason: "wrong PCRs", run: (*story).fewPCRs},
		{name: "PCR values not those quoted", code: codes.PermissionDenied, reason: "do not match the quoted digest", run: (*story).alteredPCR},
		{name: "certificate request for another key", code: codes.PermissionDenied, reason: "not the node key whose hash was quoted", run: (*story).otherCSR},
		{name: "attestation of a node never enrolled", code: codes.NotFound, reason: "enroll first", run: (*story).unenrolled},
	}
	for _, at := range attacks {
		s.t.Run(at.name, func(t *testing.T) {
			defer s.restore(t)
			before := s.snapshot()
			err := at.run(s)
			st, _ := status.FromError(err)
			if err == nil || st.Code() != at.code || !strings.Contains(st.Message(), at.reason) {
				t.Fatalf("got %v, want %s containing %q", err, at.code, at.reason)
			}
			t.Logf("refused: %s", st.Message())
			after := s.snapshot()
			if at.selfChecked {
				return
			}
			if at.authenticated == "" {
				if after != before {
					t.Fatalf("records changed:\nbefore %s\nafter  %s", before, after)
				}
				return
			}
			n := s.node(s.a.NodeName())
			c := meta.FindStatusCondition(n.Status.Conditions, v1alpha1.ConditionAttested)
			if c == nil || c.Status != metav1.ConditionFalse || c.Reason != at.authenticated || n.Status.LastAttestationResult != v1alpha1.ResultFailed {
				t.Fatalf("node status after a failed authenticated attestation: %+v", n.Status)
			}
			// Recover: the next honest attestation passes again.
			if _, err := s.a.Attest(context.Background()); err != nil {
				t.Fatalf("honest attestation after the attack: %v", err)
			}
		})
	}
}

// restore brings node A back after an attack that used the other TPM.
func (s *story) restore(t *testing.T) {
	if !s.lab.restore(t) {
		return
	}
	ctx := context.Background()
	if err := s.a.Enroll(ctx); err != nil {
		t.Fatalf("re-enrolling after the TPM rebooted: %v", err)
	}
	if _, err := s.a.Attest(ctx); err != nil {
		t.Fatalf("attesting after re-enrolling: %v", err)
	}
}

// snapshot is every node record, for comparing before and after an attack.
func (s *story) snapshot() string {
	var list v1alpha1.SovraNodeList
	if err := s.d.kube.List(context.Background(), &list); err != nil {
		s.t.Fatal(err)
	}
	b, _ := json.Marshal(list.Items)
	return string(b)
}

func (s *story) node(name string) *v1alpha1.SovraNode {
	n, err := s.d.store.GetNode(context.Background(), name)
	if err != nil {
		s.t.Fatal(err)
	}
	return n
}

// evidence builds an honest request with a fresh nonce.
func (s *story) evidence() *pb.AttestRequest {
	nk, err := agentattest.NewNodeKey()
	if err != nil {
		s.t.Fatal(err)
	}
	req, err := s.a.Evidence(context.Background(), s.a.Key(), s.a.NodeName(), nk)
	if err != nil {
		s.t.Fatal(err)
	}
	return req
}

func (s *story) send(req *pb.AttestRequest) error {
	_, err := s.d.api.Attest(context.Background(), req)
	return err
}

func (s *story) replayedNonce() error {
	req := s.evidence()
	if err := s.send(req); err != nil {
		s.t.Fatalf("first use of the nonce: %v", err)
	}
	// The first use changed the record legitimately; the replay must not.
	before := s.snapshot()
	err := s.send(req)
	if after := s.snapshot(); after != before {
		s.t.Fatal("replay changed the record")
	}
	return err
}

func (s *story) expiredNonce() error {
	req := s.evidence()
	s.d.clock.Advance(attestation.DefaultNonceTTL + time.Second)
	defer s.d.clock.Advance(-attestation.DefaultNonceTTL - time.Second) // back to the wall clock
	return s.send(req)
}

func (s *story) otherNodesNonce() error {
	ctx := context.Background()
	nr, err := s.d.api.GetNonce(ctx, &pb.NonceRequest{Node: otherNode})
	if err != nil {
		s.t.Fatal(err)
	}
	nk, _ := agentattest.NewNodeKey()
	req, err := s.a.EvidenceFor(s.a.Key(), s.a.NodeName(), nk, nr.GetNonce())
	if err != nil {
		s.t.Fatal(err)
	}
	return s.send(req)
}

func (s *story) softwareQuote() error {
	req := s.evidence()
	key, _ := rsa.GenerateKey(rand.Reader, 2048)
	digest := sha256.Sum256(req.Quote)
	sig, _ := rsa.SignPKCS1v15(rand.Reader, key, crypto.SHA256, digest[:])
	enc, err := tpm2.Signature{Alg: tpm2.AlgRSASSA, RSA: &tpm2.SignatureRSA{HashAlg: tpm2.AlgSHA256, Signature: sig}}.Encode()
	if err != nil {
		s.t.Fatal(err)
	}
	req.Signature = enc
	return s.send(req)
}

// softwareAK forges the creation parameters of a restricted signing key
// with a software RSA key (they pass go-attestation's checks) and presents
// them with this node's EK. Without the EK's private key the attacker cannot
// recover the challenge secret.
func (s *story) softwareAK() error {
	key, _ := rsa.GenerateKey(rand.Reader, 2048)
	pub := tpm2.Public{
		Type: tpm2.AlgRSA, NameAlg: tpm2.AlgSHA256,
		Attributes: tpm2.FlagSignerDefault | tpm2.FlagNoDA,
		RSAParameters: &tpm2.RSAParams{
			Sign: &tpm2.SigScheme{Alg: tpm2.AlgRSASSA, Hash: tpm2.AlgSHA256}, KeyBits: 2048,
			ModulusRaw: key.N.Bytes(),
		},
	}
	pubEnc, err := pub.Encode()
	if err != nil {
		s.t.Fatal(err)
	}
	name, _ := pub.Name()
	createData := s.a.Key().Params.CreateData // any valid TPMS_CREATION_DATA: only its hash is attested
	cdHash := sha256.Sum256(createData)
	att, err := tpm2.AttestationData{
		Magic: 0xff544347, Type: tpm2.TagAttestCreation, QualifiedSigner: name,
		AttestedCreationInfo: &tpm2.CreationInfo{Name: name, OpaqueDigest: cdHash[:]},
	}.Encode()
	if err != nil {
		s.t.Fatal(err)
	}
	d := sha256.Sum256(att)
	sig, _ := rsa.SignPKCS1v15(rand.Reader, key, crypto.SHA256, d[:])
	sigEnc, _ := tpm2.Signature{Alg: tpm2.AlgRSASSA, RSA: &tpm2.SignatureRSA{HashAlg: tpm2.AlgSHA256, Signature: sig}}.Encode()
	begin := s.a.Key().Begin(attackerUUID, "attacker", nil)
	begin.Ak = &pb.AttestationKey{Public: pubEnc, CreateData: createData, CreateAttestation: att, CreateSignature: sigEnc}
	return s.enroll(begin, func(*pb.ActivationChallenge) []byte { return random(32) })
}

// otherTPMsAK presents this node's EK with an AK made in another TPM: the
// other TPM cannot activate a credential made for this EK.
func (s *story) otherTPMsAK() error {
	tpm := s.otherTPM()
	begin := s.other.Begin(attackerUUID, "attacker", nil)
	begin.EkCertificate, begin.EkPublic = s.a.Key().EKCertificate, s.a.Key().EKPublic
	if begin.EkCertificate != nil {
		begin.EkPublic = nil
	}
	return s.enroll(begin, func(c *pb.ActivationChallenge) []byte {
		secret, err := s.other.Activate(tpm, c)
		if err != nil {
			s.t.Logf("the other TPM cannot activate: %v", err)
			return random(32)
		}
		return secret
	})
}

func (s *story) ekNotAllowed() error {
	tpm := s.otherTPM()
	begin := s.other.Begin(attackerUUID, "stranger", nil)
	begin.EkCertificate, begin.EkPublic = nil, s.other.EKPublic
	return s.enroll(begin, func(c *pb.ActivationChallenge) []byte {
		secret, _ := s.other.Activate(tpm, c)
		return secret
	})
}

// ekBrokenChain presents a certificate for the other TPM's EK issued by a CA
// that is not a configured root.
func (s *story) ekBrokenChain() error {
	tpm := s.otherTPM()
	ca, caKey := newCA(s.t, "not a TPM manufacturer")
	pub, err := x509.ParsePKIXPublicKey(s.other.EKPublic)
	if err != nil {
		s.t.Fatal(err)
	}
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "forged EK"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageKeyEncipherment,
	}, ca, pub, caKey)
	if err != nil {
		s.t.Fatal(err)
	}
	begin := s.other.Begin(attackerUUID, "stranger", nil)
	begin.EkCertificate, begin.EkPublic = der, nil
	return s.enroll(begin, func(c *pb.ActivationChallenge) []byte {
		secret, _ := s.other.Activate(tpm, c)
		return secret
	})
}

func (s *story) pcrPolicy() error {
	ctx := context.Background()
	warn := &v1alpha1.AttestationPolicy{ObjectMeta: metav1.ObjectMeta{Name: "warn-lockdown"},
		Spec: v1alpha1.AttestationPolicySpec{Claims: []v1alpha1.ClaimRule{{Name: claims.Lockdown, Values: []string{"confidentiality"}, Mode: v1alpha1.ModeWarn}}}}
	if err := s.d.kube.Create(ctx, warn); err != nil {
		s.t.Fatal(err)
	}
	defer s.d.kube.Delete(ctx, warn)
	cred, err := s.a.Attest(ctx)
	if err != nil || len(cred.Warnings) != 1 {
		s.t.Fatalf("a Warn policy must pass with one warning: %v %v", err, cred)
	}
	enforce := &v1alpha1.AttestationPolicy{ObjectMeta: metav1.ObjectMeta{Name: "golden-pcr7"},
		Spec: v1alpha1.AttestationPolicySpec{
			NodeSelector: &v1alpha1.NodeSelector{},
			PCRs:         []v1alpha1.PCRRule{{Index: 7, Values: []string{strings.Repeat("ab", 32)}, Mode: v1alpha1.ModeEnforce}},
		}}
	if err := s.d.kube.Create(ctx, enforce); err != nil {
		s.t.Fatal(err)
	}
	defer s.d.kube.Delete(ctx, enforce)
	ak := s.node(s.a.NodeName()).Spec.AKPublic
	_, err = s.a.Attest(ctx)
	if !bytes.Equal(s.node(s.a.NodeName()).Spec.AKPublic, ak) {
		s.t.Fatal("a policy failure changed the pinned AK")
	}
	return err
}

func (s *story) tamperedLog() error {
	req := s.evidence()
	log := tcglog.Firmware()
	log.Events[1].Digest[0] ^= 0xff // the Secure Boot variable measured into PCR 7
	req.EventLog = log.Bytes()
	return s.send(req)
}

func (s *story) emptyLog() error {
	req := s.evidence()
	req.EventLog = nil
	return s.send(req)
}

func (s *story) alteredClaim() error {
	req := s.evidence()
	cs, err := claims.Decode(req.Claims)
	if err != nil {
		s.t.Fatal(err)
	}
	cs.Set(claims.Lockdown, "confidentiality")
	req.Claims, _ = cs.Encode()
	return s.send(req)
}

func (s *story) malformedClaims() error {
	req := s.evidence()
	req.Claims = []byte{0xff, 0x00}
	return s.send(req)
}

func (s *story) malformedQuote() error {
	req := s.evidence()
	req.Quote = random(64)
	return s.send(req)
}

func (s *story) malformedSignature() error {
	req := s.evidence()
	req.Signature = []byte{0x00, 0x14, 0x00}
	return s.send(req)
}

func (s *story) malformedEK() error {
	begin := s.a.Key().Begin(attackerUUID, "attacker", nil)
	begin.EkCertificate, begin.EkPublic = random(300), nil
	return s.enroll(begin, func(*pb.ActivationChallenge) []byte { return random(32) })
}

func (s *story) oversizedMessage() error {
	req := s.evidence()
	req.EventLog = make([]byte, 3<<20)
	return s.send(req)
}

func (s *story) oversizedLog() error {
	req := s.evidence()
	req.EventLog = append(req.EventLog, make([]byte, 1<<20)...)
	return s.send(req)
}

func (s *story) requote(alg goattest.HashAlg, pcrs []int) *pb.AttestRequest {
	req := s.evidence()
	q, err := s.a.Key().Quote(s.a.TPM, claims.ExtraData(req.Nonce, req.Claims), alg, pcrs)
	if err != nil {
		s.t.Fatal(err)
	}
	return agentattest.Request(req.Node, req.Nonce, req.Claims, q, req.EventLog, req.Csr)
}

func (s *story) sha1Quote() error {
	return s.send(s.requote(goattest.HashSHA1, agentattest.QuotedPCRs))
}

func (s *story) fewPCRs() error {
	return s.send(s.requote(goattest.HashSHA256, []int{7}))
}

func (s *story) alteredPCR() error {
	req := s.evidence()
	req.Pcrs[0].Digest = bytes.Repeat([]byte{0}, 32)
	return s.send(req)
}

func (s *story) otherCSR() error {
	req := s.evidence()
	nk, _ := agentattest.NewNodeKey()
	req.Csr, _ = nk.CSR(s.a.NodeName())
	return s.send(req)
}

func (s *story) unenrolled() error {
	req := s.evidence()
	req.Node = "ek-" + strings.Repeat("0", 32)
	return s.send(req)
}

// otherTPM returns TPM 1 with an AK made in it, switching TPMs in labs that
// run one at a time; the agent's TPM switches back on its next use.
func (s *story) otherTPM() agentattest.TPM {
	tpm, _ := s.lab.use(s.t, 1)
	if s.other == nil {
		k, err := agentattest.NewKey(tpm)
		if err != nil {
			s.t.Fatal(err)
		}
		s.other = k
	}
	return tpm
}

// enroll runs an enrollment round trip with a chosen answer.
func (s *story) enroll(begin *pb.EnrollBegin, answer func(*pb.ActivationChallenge) []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stream, err := s.d.api.Enroll(ctx)
	if err != nil {
		return err
	}
	if err := stream.Send(&pb.EnrollRequest{Step: &pb.EnrollRequest_Begin{Begin: begin}}); err != nil {
		return err
	}
	resp, err := stream.Recv()
	if err != nil {
		return err
	}
	secret := answer(resp.GetChallenge())
	if err := stream.Send(&pb.EnrollRequest{Step: &pb.EnrollRequest_Proof{Proof: &pb.ActivationProof{Secret: secret}}}); err != nil {
		return err
	}
	_, err = stream.Recv()
	return err
}

// newUUID returns a random SMBIOS-style UUID, so that stories on a real API
// do not collide with the records of earlier runs.
func newUUID() string {
	b := random(16)
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

func random(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}
