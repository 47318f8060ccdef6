package nodeapi

import (
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"os"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/attestation"
	"github.com/sovra-dev/sovra/internal/attest"
	"github.com/sovra-dev/sovra/internal/attest/attesttest"
	pb "github.com/sovra-dev/sovra/internal/nodeapi"
)

// quietStore drops events, which a fuzzer would pile up.
type quietStore struct{ *attestation.KubeStore }

func (quietStore) Event(context.Context, runtime.Object, bool, string, string) {}

// fixedClock is the time the fixture's nonce was issued.
type fixedClock time.Time

func (c fixedClock) Now() time.Time { return time.Time(c) }

// fixtureNode is the record name of the fixture's TPM.
func fixtureNode(f *attesttest.Fixture) string {
	ek, err := attest.ParseEK(f.EKCertificate, nil)
	if err != nil {
		panic(err)
	}
	return attestation.NodeName(ek.Hash)
}

// newHandler serves the attestation service with the node CA key of the
// daemon that issued the fixture's nonce, at the time it issued it.
func newHandler(t testing.TB) (*handler, *attesttest.Fixture) {
	t.Helper()
	f, err := attesttest.Load()
	if err != nil {
		t.Fatal(err)
	}
	s, _ := attestation.Scheme()
	kube := fake.NewClientBuilder().WithScheme(s).WithStatusSubresource(&v1alpha1.SovraNode{}).Build()
	store := quietStore{&attestation.KubeStore{Client: kube, Logger: zap.NewNop()}}
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	roots.AppendCertsFromPEM(f.EKRootPEM)
	inter.AppendCertsFromPEM(f.EKIntermediatePEM)
	k, err := x509.ParsePKCS8PrivateKey(f.NodeCAKey)
	if err != nil {
		t.Fatal(err)
	}
	key := k.(*ecdsa.PrivateKey)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "node CA"},
		NotBefore: f.IssuedAt.Add(-time.Hour), NotAfter: f.IssuedAt.Add(time.Hour), IsCA: true, BasicConstraintsValid: true}
	der, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	ca, _ := x509.ParseCertificate(der)
	svc, err := attestation.New(attestation.Config{EK: attest.EKPolicy{Roots: roots, Intermediates: inter}, NodeCA: ca, NodeCAKey: key},
		store, fixedClock(f.IssuedAt), zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	node := &v1alpha1.SovraNode{ObjectMeta: metav1.ObjectMeta{Name: fixtureNode(f), UID: "uid-fixture"},
		Spec: v1alpha1.SovraNodeSpec{EKHash: strings.Repeat("a", 64), EKPublic: []byte{1}, AKPublic: f.AKPublic}}
	if err := store.CreateNode(context.Background(), node); err != nil {
		t.Fatal(err)
	}
	return &handler{svc: svc, logger: zap.NewNop()}, f
}

func fixtureRequest(f *attesttest.Fixture) *pb.AttestRequest {
	req := &pb.AttestRequest{Node: fixtureNode(f), Nonce: f.Nonce, Claims: f.Claims, Quote: f.Quote, Signature: f.Signature,
		PcrHashAlg: uint32(attest.QuoteHash), EventLog: f.EventLog, Csr: f.CSR}
	for _, i := range attest.QuotedPCRs {
		req.Pcrs = append(req.Pcrs, &pb.PCRValue{Index: uint32(i), Digest: f.PCRs[i]})
	}
	return req
}

func TestAttestThroughHandler(t *testing.T) {
	h, f := newHandler(t)
	ctx := context.Background()
	resp, err := h.Attest(ctx, fixtureRequest(f))
	if err != nil || len(resp.GetCertificateChain()) != 2 {
		t.Fatalf("Attest = %v, %v", resp, err)
	}
	_, err = h.Attest(ctx, fixtureRequest(f))
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(status.Convert(err).Message(), "request a new nonce") {
		t.Fatalf("replay = %v, want FailedPrecondition telling to request a new nonce", err)
	}
	dup := fixtureRequest(f)
	dup.Pcrs = append(dup.Pcrs, dup.Pcrs[0])
	if _, err := h.Attest(ctx, dup); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("duplicate PCR = %v, want InvalidArgument", err)
	}
}

func TestConfigNeedsTLS(t *testing.T) {
	err := Config{}.Validate()
	if err == nil || !strings.Contains(err.Error(), "TLS serving certificate") || !strings.Contains(err.Error(), "node CA") {
		t.Fatalf("Validate() = %v, want TLS and attestation problems together", err)
	}
	if err := (Config{TLS: &tls.Config{}}).Validate(); err == nil {
		t.Fatal("a TLS config without a certificate passed")
	}
}

// FuzzAttestRequest feeds raw wire bytes through protobuf decoding, the
// conversion and the service: whatever a node sends, it gets a status.
func FuzzAttestRequest(f *testing.F) {
	h, fx := newHandler(f)
	good, _ := proto.Marshal(fixtureRequest(fx))
	f.Add(good)
	f.Fuzz(func(t *testing.T, b []byte) {
		var req pb.AttestRequest
		if proto.Unmarshal(b, &req) != nil {
			return
		}
		if _, err := h.Attest(context.Background(), &req); err != nil {
			if _, ok := status.FromError(err); !ok {
				t.Fatalf("error without a status: %v", err)
			}
		}
	})
}

// FuzzEnrollBegin feeds raw wire bytes of the first enrollment message
// through decoding, EK policy and AK checks.
func FuzzEnrollBegin(f *testing.F) {
	h, fx := newHandler(f)
	good, _ := proto.Marshal(beginFor(fx))
	f.Add(good)
	f.Fuzz(func(t *testing.T, b []byte) {
		var begin pb.EnrollBegin
		if proto.Unmarshal(b, &begin) != nil {
			return
		}
		_, _, _ = h.svc.BeginEnrollment(context.Background(), enrollRequest(&begin, "10.0.0.1:1"))
	})
}

func beginFor(fx *attesttest.Fixture) *pb.EnrollBegin {
	return &pb.EnrollBegin{EkCertificate: fx.EKCertificate, Ak: &pb.AttestationKey{
		Public: fx.AKPublic, CreateData: fx.AKCreateData, CreateAttestation: fx.AKCreateAttestation, CreateSignature: fx.AKCreateSignature,
	}, Uuid: "4c4c4544-0042-3510-8051-b7c04f4e3332", Hostname: "node", Addresses: []string{"10.0.0.1"}}
}

// TestWriteFuzzSeeds rewrites the seed corpora when SOVRA_WRITE_FUZZ_SEEDS
// is set.
func TestWriteFuzzSeeds(t *testing.T) {
	if os.Getenv("SOVRA_WRITE_FUZZ_SEEDS") == "" {
		t.Skip("set SOVRA_WRITE_FUZZ_SEEDS=1 to rewrite testdata/fuzz")
	}
	fx, err := attesttest.Load()
	if err != nil {
		t.Fatal(err)
	}
	good, _ := proto.Marshal(fixtureRequest(fx))
	begin, _ := proto.Marshal(beginFor(fx))
	for target, b := range map[string][]byte{"FuzzAttestRequest": good, "FuzzEnrollBegin": begin} {
		if err := attesttest.WriteSeed(".", target, "recorded", b); err != nil {
			t.Fatal(err)
		}
		if err := attesttest.WriteSeed(".", target, "empty", nil); err != nil {
			t.Fatal(err)
		}
	}
}
