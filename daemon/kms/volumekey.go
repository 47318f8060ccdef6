package kms

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/attestation"
	"github.com/sovra-dev/sovra/daemon/custody"
	"github.com/sovra-dev/sovra/internal/volumeapi"
)

const (
	opVolumeKey       = "VolumeKey"
	reasonVolumeKey   = "VolumeKeyReleased"
	reasonNoClientID  = "NoNodeCredential"
	reasonStaleCred   = "CredentialOlderThanAttestation"
	volumeKeyTimeout  = 8 * time.Second
	reasonRecordClaim = "RecordMismatch"
)

// volumeIDPattern is what a volume ID may look like.
var volumeIDPattern = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// RegisterVolumeKeys adds the volume key service to a gRPC server. The
// server must verify client certificates against the node CA (the node
// API's mutual TLS); calls without a verified node credential are refused.
func (s *Service) RegisterVolumeKeys(g grpc.ServiceRegistrar) {
	volumeapi.RegisterVolumeKeyServiceServer(g, &volumeKeys{s: s})
}

// volumeKeys serves the keys of agent-managed volumes.
type volumeKeys struct {
	volumeapi.UnimplementedVolumeKeyServiceServer
	s *Service
}

// GetVolumeKey releases a volume key to a node that presents the node
// credential of an attestation that passed and is still its last one.
func (v *volumeKeys) GetVolumeKey(ctx context.Context, req *volumeapi.GetVolumeKeyRequest) (*volumeapi.GetVolumeKeyResponse, error) {
	s := v.s
	c := &call{start: time.Now(), op: opVolumeKey, src: callSource(ctx, s.cfg.TrustedProxies)}
	s.pace.called()
	box := s.store.Load()
	if box == nil {
		return nil, errUnavailable
	}
	st := box.Store
	cert := nodeCertificate(ctx)
	if cert == nil {
		return nil, s.deny(c, reasonNoClientID, "no verified node credential")
	}
	rec := st.Node(cert.Subject.CommonName)
	if rec == nil {
		c.uuid = ""
		return nil, s.deny(c, reasonUnknown, "no record "+cert.Subject.CommonName+" (revoked?)")
	}
	c.record, c.uuid = rec, lowerUUID(rec.Spec.UUID)
	switch {
	case !volumeIDPattern.MatchString(req.GetVolumeId()):
		return nil, s.deny(c, reasonInvalid, fmt.Sprintf("volume ID of %d bytes", len(req.GetVolumeId())))
	case !s.limits.Allow("node/"+rec.Name, s.clock.Now()):
		s.record(c, false, reasonRateLimited, "over the per-node or global rate")
		return nil, errRateLimited
	case quarantined(rec):
		return nil, s.deny(c, reasonQuarantined, "record is quarantined")
	case !enrolled(rec):
		return nil, s.deny(c, reasonNotEnrolled, "node is not enrolled")
	case !attestedOK(rec):
		return nil, s.deny(c, reasonNotAttested, fmt.Sprintf("last attestation result %q", rec.Status.LastAttestationResult))
	case rec.Status.LastAttestationTime == nil || rec.Status.LastAttestationTime.Time.Add(attestationTimeGranule).Before(cert.NotBefore):
		// The credential is newer than the last attestation on record: it
		// cannot be from the attestation that passed.
		return nil, s.deny(c, reasonStaleCred, "the credential does not come from the last attestation")
	case rec.Spec.UUID == "":
		return nil, s.deny(c, reasonRecordClaim, "the record claims no UUID")
	case s.cfg.BindAddresses && !knowsAddress(rec, c.src.Addr):
		return nil, s.deny(c, reasonAddress, "source is not a known address of the node")
	}
	ctx, cancel := context.WithTimeout(ctx, volumeKeyTimeout)
	defer cancel()
	salted, reason, detail := s.ensureSalt(ctx, st, rec.Name, c, reasonRecordClaim, nil)
	if salted == nil {
		return nil, s.deny(c, reason, detail)
	}
	key, version, err := s.keyring.VolumeKey(req.GetKeyVersion(), salted.Status.KeySalt, c.uuid, req.GetVolumeId())
	if err != nil {
		reason := reasonInternal
		if errors.Is(err, custody.ErrUnknownKey) {
			reason = reasonBlobKey
		}
		return nil, s.deny(c, reason, err.Error())
	}
	s.allow(c, reasonVolumeKey, fmt.Sprintf("key of volume %s (master key version %d) released to the attested node", req.GetVolumeId(), version))
	return &volumeapi.GetVolumeKeyResponse{Key: key, KeyVersion: version}, nil
}

// ensureSalt reads record name from the API (not the cache: a key derived
// from a stale salt would be lost) and returns it with a salt, writing one
// if it has none (optimistically: a concurrent writer's salt wins and is
// used). A record that no longer claims the call's UUID is refused with
// mismatch; admit, when set, may refuse the record before any salt is written.
func (s *Service) ensureSalt(ctx context.Context, st Store, name string, c *call, mismatch string,
	admit func(*v1alpha1.SovraNode) (reason, detail string)) (*v1alpha1.SovraNode, string, string) {
	for range saltAttempts {
		rec, err := st.Get(ctx, name)
		switch {
		case errors.Is(err, errNotFound):
			return nil, reasonUnknown, "record " + name + " was deleted"
		case err != nil:
			return nil, reasonInternal, err.Error()
		}
		c.record = rec
		switch {
		case lowerUUID(rec.Spec.UUID) != c.uuid:
			return nil, mismatch, "record " + name + " no longer claims this UUID"
		case quarantined(rec):
			return nil, reasonQuarantined, "record is quarantined"
		}
		if admit != nil {
			if reason, detail := admit(rec); reason != "" {
				return nil, reason, detail
			}
		}
		switch {
		case len(rec.Status.KeySalt) == custody.SaltSize:
			return rec, "", ""
		case len(rec.Status.KeySalt) != 0:
			return nil, reasonBadSalt, fmt.Sprintf("salt of %d bytes", len(rec.Status.KeySalt))
		}
		salt, err := custody.NewSalt()
		if err != nil {
			return nil, reasonInternal, err.Error()
		}
		rec = rec.DeepCopy()
		rec.Status.KeySalt = salt
		switch err := st.UpdateStatus(ctx, rec); {
		case err == nil:
			s.logger.Info("node key salt created", zap.String("node", rec.Name), zap.String("node_uuid", c.uuid))
			return rec, "", ""
		case !errors.Is(err, errConflict):
			return nil, reasonInternal, err.Error()
		}
	}
	return nil, reasonInternal, "the record kept changing while its salt was written"
}

// nodeCertificate is the verified client certificate of the call, if it is
// a node credential (organization attestation.NodeOrganization).
func nodeCertificate(ctx context.Context) *x509.Certificate {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return nil
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(info.State.VerifiedChains) == 0 || len(info.State.VerifiedChains[0]) == 0 {
		return nil
	}
	leaf := info.State.VerifiedChains[0][0]
	if !slices.Contains(leaf.Subject.Organization, attestation.NodeOrganization) ||
		!slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageClientAuth) {
		return nil
	}
	return leaf
}
