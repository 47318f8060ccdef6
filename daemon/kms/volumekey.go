package kms

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"time"

	"google.golang.org/grpc"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/custody"
	"github.com/sovra-dev/sovra/daemon/nodeauth"
	"github.com/sovra-dev/sovra/internal/volumeapi"
)

const (
	opVolumeKey       = "VolumeKey"
	reasonVolumeKey   = "VolumeKeyReleased"
	reasonStaleCred   = "CredentialNotOfCurrentBoot"
	volumeKeyTimeout  = 8 * time.Second
	reasonRecordClaim = "RecordMismatch"
)

// volumeIDPattern is what a volume ID may look like.
var volumeIDPattern = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// RegisterVolumeKeys adds the volume key service to a gRPC server. The
// server must authenticate node credentials (package nodeauth's
// interceptors): the service refuses a call that was not.
func (s *Service) RegisterVolumeKeys(g grpc.ServiceRegistrar) {
	volumeapi.RegisterVolumeKeyServiceServer(g, &volumeKeys{s: s})
}

// volumeKeys serves the keys of agent-managed volumes.
type volumeKeys struct {
	volumeapi.UnimplementedVolumeKeyServiceServer
	s *Service
}

// GetVolumeKey releases a volume key to a node whose credential comes from
// a passing attestation of its current boot, for its current record.
func (v *volumeKeys) GetVolumeKey(ctx context.Context, req *volumeapi.GetVolumeKeyRequest) (*volumeapi.GetVolumeKeyResponse, error) {
	s := v.s
	c := &call{start: time.Now(), op: opVolumeKey, src: callSource(ctx, s.cfg.TrustedProxies)}
	box := s.store.Load()
	if box == nil {
		return nil, errUnavailable
	}
	st := box.Store
	id, err := nodeauth.Require(ctx)
	if err != nil {
		return nil, err
	}
	rec := id.Record
	c.record, c.uuid = rec, lowerUUID(rec.Spec.UUID)
	switch {
	case !volumeIDPattern.MatchString(req.GetVolumeId()):
		return nil, s.deny(c, reasonInvalid, fmt.Sprintf("volume ID of %d bytes", len(req.GetVolumeId())))
	case !s.limits.Allow("node/"+rec.Name, s.clock.Now()):
		s.record(c, false, reasonRateLimited, "over the per-node rate")
		return nil, errRateLimited
	case !enrolled(rec):
		return nil, s.deny(c, reasonNotEnrolled, "node is not enrolled")
	case !id.CurrentBoot():
		// The key is released only after an attestation of this boot.
		return nil, s.deny(c, reasonStaleCred, "the credential comes from an earlier boot's attestation")
	case rec.Spec.UUID == "":
		return nil, s.deny(c, reasonRecordClaim, "the record claims no UUID")
	case s.cfg.BindAddresses && !knowsAddress(rec, c.src.Addr):
		return nil, s.deny(c, reasonAddress, "source is not a known address of the node")
	}
	ctx, cancel := context.WithTimeout(ctx, volumeKeyTimeout)
	defer cancel()
	salted, reason, detail := s.ensureSalt(ctx, st, rec.Name, c, reasonRecordClaim, func(fresh *v1alpha1.SovraNode) (string, string) {
		if fresh.UID != rec.UID {
			return reasonRecordClaim, "the record was re-created"
		}
		return "", ""
	})
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
	s.allow(c, reasonVolumeKey, fmt.Sprintf("key of volume %s (master key version %d) released to boot %s", req.GetVolumeId(), version, id.Boot))
	return &volumeapi.GetVolumeKeyResponse{Key: key, KeyVersion: version}, nil
}
