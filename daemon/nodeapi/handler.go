package nodeapi

import (
	"context"
	"errors"
	"fmt"

	goattest "github.com/google/go-attestation/attest"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/sovra-dev/sovra/daemon/attestation"
	pb "github.com/sovra-dev/sovra/internal/nodeapi"
)

// pcrCount is the number of PCRs of a PC Client TPM.
const pcrCount = 24

// handler implements the gRPC service over the attestation service.
type handler struct {
	pb.UnimplementedNodeServiceServer
	svc    *attestation.Service
	logger *zap.Logger
}

func (h *handler) Enroll(stream pb.NodeService_EnrollServer) error {
	ctx, cancel := context.WithTimeout(stream.Context(), EnrollTimeout)
	defer cancel()
	first, err := recv(ctx, stream)
	if err != nil {
		return err
	}
	b := first.GetBegin()
	if b == nil || b.GetAk() == nil {
		return status.Error(codes.InvalidArgument, "enrollment must begin with the EK and the AK parameters")
	}
	var from string
	if p, ok := peer.FromContext(ctx); ok {
		from = p.Addr.String()
	}
	e, ch, err := h.svc.BeginEnrollment(ctx, enrollRequest(b, from))
	if err != nil {
		return h.toStatus("enrollment", err)
	}
	if err := stream.Send(&pb.EnrollResponse{Step: &pb.EnrollResponse_Challenge{Challenge: &pb.ActivationChallenge{
		Credential: ch.Credential, Secret: ch.Secret,
	}}}); err != nil {
		return err
	}
	second, err := recv(ctx, stream)
	if err != nil {
		return err
	}
	proof := second.GetProof()
	if proof == nil {
		return status.Error(codes.InvalidArgument, "answer the activation challenge with the secret your TPM recovered")
	}
	node, err := h.svc.FinishEnrollment(ctx, e, proof.GetSecret())
	if err != nil {
		return h.toStatus("enrollment", err)
	}
	return stream.Send(&pb.EnrollResponse{Step: &pb.EnrollResponse_Result{Result: &pb.EnrollResult{
		Node: node.Name, EkHash: node.Spec.EKHash,
	}}})
}

// enrollRequest converts the first enrollment message.
func enrollRequest(b *pb.EnrollBegin, from string) attestation.EnrollRequest {
	return attestation.EnrollRequest{
		EKCertificate: b.GetEkCertificate(), EKPublic: b.GetEkPublic(),
		AK: goattest.AttestationParameters{
			Public: b.GetAk().GetPublic(), CreateData: b.GetAk().GetCreateData(),
			CreateAttestation: b.GetAk().GetCreateAttestation(), CreateSignature: b.GetAk().GetCreateSignature(),
		},
		UUID: b.GetUuid(), Hostname: b.GetHostname(), Addresses: b.GetAddresses(), Peer: from,
	}
}

func recv(ctx context.Context, stream pb.NodeService_EnrollServer) (*pb.EnrollRequest, error) {
	type result struct {
		m   *pb.EnrollRequest
		err error
	}
	c := make(chan result, 1)
	go func() {
		m, err := stream.Recv()
		c <- result{m, err}
	}()
	select {
	case <-ctx.Done():
		return nil, status.Error(codes.DeadlineExceeded, "enrollment timed out: answer the activation challenge promptly")
	case r := <-c:
		return r.m, r.err
	}
}

func (h *handler) GetNonce(ctx context.Context, req *pb.NonceRequest) (*pb.NonceResponse, error) {
	nonce, exp, err := h.svc.IssueNonce(ctx, req.GetNode())
	if err != nil {
		return nil, h.toStatus("nonce", err)
	}
	return &pb.NonceResponse{Nonce: nonce, ExpiresUnix: exp.Unix()}, nil
}

func (h *handler) Attest(ctx context.Context, req *pb.AttestRequest) (*pb.AttestResponse, error) {
	ar, err := attestRequest(req)
	if err != nil {
		return nil, err
	}
	res, err := h.svc.Attest(ctx, ar)
	if err != nil {
		return nil, h.toStatus("attestation", err)
	}
	return &pb.AttestResponse{CertificateChain: res.Chain, ExpiresUnix: res.Expires.Unix(), Warnings: res.Warnings}, nil
}

// attestRequest converts an attestation message; its errors are statuses.
func attestRequest(req *pb.AttestRequest) (attestation.AttestRequest, error) {
	pcrHash := req.GetPcrHashAlg()
	if pcrHash > 0xffff {
		return attestation.AttestRequest{}, status.Error(codes.InvalidArgument, "pcr_hash_alg is not a TPM algorithm ID; send 0x000B (SHA-256)")
	}
	if len(req.GetPcrs()) > pcrCount {
		return attestation.AttestRequest{}, status.Errorf(codes.InvalidArgument, "%d PCR values sent; send PCRs 0-7 and 11", len(req.GetPcrs()))
	}
	pcrs := make(map[int][]byte, len(req.GetPcrs()))
	for _, p := range req.GetPcrs() {
		if p.GetIndex() >= pcrCount {
			return attestation.AttestRequest{}, status.Errorf(codes.InvalidArgument, "PCR index %d out of range; send PCRs 0-7 and 11", p.GetIndex())
		}
		if _, dup := pcrs[int(p.GetIndex())]; dup {
			return attestation.AttestRequest{}, status.Errorf(codes.InvalidArgument, "PCR %d sent twice; send each of PCRs 0-7 and 11 once", p.GetIndex())
		}
		pcrs[int(p.GetIndex())] = p.GetDigest()
	}
	return attestation.AttestRequest{
		Node: req.GetNode(), Nonce: req.GetNonce(), Claims: req.GetClaims(),
		Quote: req.GetQuote(), Signature: req.GetSignature(), PCRHash: uint16(pcrHash),
		PCRs: pcrs, EventLog: req.GetEventLog(), CSR: req.GetCsr(),
	}, nil
}

// toStatus maps service errors to gRPC codes with a message that says what
// to do. Errors that are not the node's fault are logged and not detailed.
func (h *handler) toStatus(what string, err error) error {
	switch {
	case errors.Is(err, attestation.ErrInvalid):
		return status.Errorf(codes.InvalidArgument, "%s: %v; fix the request", what, err)
	case errors.Is(err, attestation.ErrNodeNotFound):
		return status.Errorf(codes.NotFound, "%s: %v; enroll first", what, err)
	case errors.Is(err, attestation.ErrNonce):
		return status.Errorf(codes.FailedPrecondition, "%s: %v; request a new nonce", what, err)
	case errors.Is(err, attestation.ErrRefused):
		return status.Errorf(codes.PermissionDenied, "%s: %v", what, err)
	case errors.Is(err, attestation.ErrBusy):
		return status.Errorf(codes.ResourceExhausted, "%s: %v", what, err)
	case errors.Is(err, attestation.ErrConflict):
		return status.Errorf(codes.Aborted, "%s: concurrent update; retry", what)
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		return status.Errorf(codes.DeadlineExceeded, "%s: timed out; retry", what)
	default:
		h.logger.Error(what+" failed", zap.Error(err))
		return status.Error(codes.Unavailable, fmt.Sprintf("%s: the daemon could not complete the request; retry later", what))
	}
}
