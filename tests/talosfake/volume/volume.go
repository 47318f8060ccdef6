// Package volume imitates how Talos prepares its system volumes (STATE,
// EPHEMERAL) with LUKS2 encryption: a partition with no signature is
// formatted and encrypted with a new key per key slot (a KMS slot Seals 32
// random bytes and keeps the sealed blob in the slot's LUKS2 token), then
// opened like every existing LUKS2 volume (a KMS slot Unseals its token's
// blob; the key must open the slot); other configured slots are then
// synced. A partition is a directory: luks2.json stands for the LUKS2
// header (key slots with a digest of their passphrase, tokens with the
// sealed blobs) and data/ for the filesystem, which the simulator reads
// only once the volume is open.
//
// Talos sources imitated (siderolabs/talos v1.13.9):
//
//   - internal/app/machined/pkg/controllers/block/internal/volumes/encrypt.go
//     (HandleEncryptionWithHandler: blkid, format or open, type mismatch);
//
//   - internal/pkg/encryption/encryption.go (NewHandler slot order,
//     FormatAndEncrypt, Open, tryHandlers with 20 s per handler, syncKeys,
//     checkKey, addKey);
//
//   - internal/pkg/encryption/keys/kms.go (the KMS key handler: a new gRPC
//     client per call, 10 s, TLS with the machine's roots, no client
//     credential, Request{NodeUuid, Data}, the passphrase is the base64 of
//     the key), keys/static.go, keys/token.go (token type sideroKMS);
//
//   - internal/pkg/endpoint/endpoint.go (grpc:// is plaintext, no scheme is
//     grpc://, https:// without a port gets :443);
//
//   - pkg/httpdefaults (roots), pkg/machinery/client/dialer (the proxy).
//
//   - internal/pkg/encryption/keys/salted.go (lockToState: the key is
//     suffixed with STATE's encryption salt, after the KMS call).
//
// Not imitated: nodeID and TPM keys (their slots fail as a handler that
// cannot produce a key); ciphers, sizes and performance options are
// accepted and ignored.
package volume

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"time"

	"github.com/siderolabs/kms-client/api/kms"
	"github.com/siderolabs/talos/pkg/machinery/client/dialer"
	"github.com/siderolabs/talos/pkg/machinery/config/config"
	blocktype "github.com/siderolabs/talos/pkg/machinery/config/types/block"
	"github.com/siderolabs/talos/pkg/machinery/resources/block"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
)

// Files of a partition directory.
const (
	// HeaderFile stands for the LUKS2 header.
	HeaderFile = "luks2.json"
	// DataDir is the volume's filesystem.
	DataDir = "data"

	// TokenTypeKMS is the LUKS2 token type of a KMS slot (keys/token.go).
	TokenTypeKMS = "sideroKMS"

	// kmsTimeout is what the KMS handler gives every Seal and Unseal.
	kmsTimeout = 10 * time.Second
	// keyHandlerTimeout is what tryHandlers gives each slot.
	keyHandlerTimeout = 20 * time.Second
	// encryptionTimeout bounds one format-and-open or open.
	encryptionTimeout = time.Minute
	// keySize is the size of a KMS slot's key.
	keySize = 32
	// digestSaltSize is the salt of a slot's passphrase digest.
	digestSaltSize = 32
)

// ErrTypeMismatch is a partition that holds a filesystem where an
// encrypted volume is configured (Talos does not encrypt it in place).
var ErrTypeMismatch = errors.New("block dev type mismatch")

// errTokenInvalid is keys.ErrTokenInvalid: a slot without its handler's token.
var errTokenInvalid = errors.New("invalid token")

// Spec is a volume's encryption (block.EncryptionSpec as Talos converts it).
type Spec struct {
	Provider block.EncryptionProviderType
	Keys     []KeySpec
}

// KeySpec is one key slot.
type KeySpec struct {
	Slot int
	// KMSEndpoint is set for a KMS slot.
	KMSEndpoint string
	// Static is set for a static passphrase slot.
	Static []byte
	// LockToState suffixes the key with STATE's encryption salt.
	LockToState bool
	// Unsupported names a key type the simulator does not have.
	Unsupported string
}

// Encrypted reports whether the spec asks for LUKS2.
func (s Spec) Encrypted() bool { return s.Provider == block.EncryptionProviderLUKS2 }

// SpecFromConfig converts a machine configuration's encryption settings; a
// nil cfg is no encryption.
func SpecFromConfig(cfg config.EncryptionConfig) Spec {
	if isNil(cfg) {
		return Spec{}
	}

	spec := Spec{Provider: cfg.Provider()}

	for _, k := range cfg.Keys() {
		ks := KeySpec{Slot: k.Slot(), LockToState: k.LockToSTATE()}

		switch {
		case !isNil(k.KMS()):
			ks.KMSEndpoint = k.KMS().Endpoint()
		case !isNil(k.Static()):
			ks.Static = k.Static().Key()
		case !isNil(k.NodeID()):
			ks.Unsupported = "nodeID"
		case !isNil(k.TPM()):
			ks.Unsupported = "tpm"
		default:
			ks.Unsupported = "unknown"
		}

		spec.Keys = append(spec.Keys, ks)
	}

	return spec
}

// MarshalMeta is the STATE encryption config Talos keeps in META tag 0x09
// (volumes.MarshalEncryptionMeta: the JSON of the config's
// EncryptionSpec; "null" without encryption).
func MarshalMeta(cfg config.EncryptionConfig) ([]byte, error) {
	if isNil(cfg) {
		return json.Marshal(nil)
	}

	spec := blocktype.EncryptionSpec{
		EncryptionProvider:    cfg.Provider(),
		EncryptionCipher:      cfg.Cipher(),
		EncryptionKeySize:     cfg.KeySize(),
		EncryptionBlockSize:   cfg.BlockSize(),
		EncryptionPerfOptions: cfg.Options(),
	}

	for _, k := range cfg.Keys() {
		key := blocktype.EncryptionKey{KeySlot: k.Slot()}

		if k.LockToSTATE() {
			key.KeyLockToSTATE = new(bool)
			*key.KeyLockToSTATE = true
		}

		switch {
		case !isNil(k.KMS()):
			key.KeyKMS = &blocktype.EncryptionKeyKMS{KMSEndpoint: k.KMS().Endpoint()}
		case !isNil(k.Static()):
			key.KeyStatic = &blocktype.EncryptionKeyStatic{KeyData: string(k.Static().Key())}
		case !isNil(k.NodeID()):
			key.KeyNodeID = &blocktype.EncryptionKeyNodeID{}
		case !isNil(k.TPM()):
			key.KeyTPM = &blocktype.EncryptionKeyTPM{}
		}

		spec.EncryptionKeys = append(spec.EncryptionKeys, key)
	}

	return json.Marshal(spec)
}

// UnmarshalMeta reads META tag 0x09 back (volumes.UnmarshalEncryptionMeta).
func UnmarshalMeta(data []byte) (Spec, error) {
	var spec blocktype.EncryptionSpec

	if err := json.Unmarshal(data, &spec); err != nil {
		return Spec{}, fmt.Errorf("error unmarshalling state encryption meta key: %w", err)
	}

	if spec.IsZero() {
		return Spec{}, nil
	}

	return SpecFromConfig(spec), nil
}

func isNil(v any) bool {
	if v == nil {
		return true
	}

	rv := reflect.ValueOf(v)

	return rv.Kind() == reflect.Pointer && rv.IsNil()
}

// Helpers are what the key handlers read from the machine.
type Helpers struct {
	// UUID is the machine's SMBIOS UUID (SystemInformation).
	UUID string
	// Roots are the machine's trusted roots for KMS TLS, read at every
	// call (httpdefaults.RootCAs).
	Roots func() *x509.CertPool
	// Salt is STATE's encryption salt (secrets.EncryptionSalt), for keys
	// locked to STATE; it fails while STATE is not open.
	Salt func(ctx context.Context) ([]byte, error)
}

// Volume is one partition.
type Volume struct {
	// Label is the volume's name (STATE, EPHEMERAL).
	Label string
	// Dir is the partition's directory.
	Dir string
}

// Signature is what blkid finds on the partition: "" (nothing: not
// created, or wiped), "luks" or "xfs".
func (v Volume) Signature() string {
	if _, err := os.Stat(filepath.Join(v.Dir, HeaderFile)); err == nil {
		return "luks"
	}

	if _, err := os.Stat(filepath.Join(v.Dir, DataDir)); err == nil {
		return "xfs"
	}

	return ""
}

// Exists reports whether the partition holds anything.
func (v Volume) Exists() bool { return v.Signature() != "" }

// Data is the volume's filesystem; read it only once Prepare succeeded.
func (v Volume) Data() string { return filepath.Join(v.Dir, DataDir) }

// Wipe removes the partition's signatures and content, as a reset does.
func (v Volume) Wipe() error {
	if err := os.RemoveAll(v.Dir); err != nil {
		return fmt.Errorf("wiping %s: %w", v.Label, err)
	}

	return nil
}

// Result is what Prepare did.
type Result struct {
	// Formatted is set when the volume was created (and, encrypted, sealed).
	Formatted bool
	// Slot is the key slot that opened an encrypted volume.
	Slot int
	// FailedSyncs are the other slots that could not be synced.
	FailedSyncs []string
}

// Prepare formats the volume when its partition is empty and opens it, as
// the volume manager does for a provisioned volume. Every error is worth a
// retry (the volume manager retries every 30 s), ErrTypeMismatch included.
func (v Volume) Prepare(ctx context.Context, spec Spec, h Helpers, logger *zap.Logger) (Result, error) {
	logger = logger.With(zap.String("volume", v.Label))

	if !spec.Encrypted() {
		switch v.Signature() {
		case "luks":
			return Result{}, fmt.Errorf("volume %s is encrypted and its configuration has no encryption", v.Label)
		case "":
			logger.Info("formatting volume")

			if err := os.MkdirAll(v.Data(), 0o700); err != nil {
				return Result{}, fmt.Errorf("formatting %s: %w", v.Label, err)
			}

			return Result{Formatted: true}, nil
		}

		return Result{}, nil
	}

	ctx, cancel := context.WithTimeout(ctx, encryptionTimeout)
	defer cancel()

	handlers := make([]keyHandler, 0, len(spec.Keys))
	for _, k := range spec.Keys {
		handlers = append(handlers, newKeyHandler(k, h))
	}

	slices.SortFunc(handlers, func(a, b keyHandler) int { return a.slot() - b.slot() })

	var res Result

	switch v.Signature() {
	case "":
		logger.Info("formatting and encrypting volume")

		if err := v.formatAndEncrypt(ctx, handlers, logger); err != nil {
			return res, fmt.Errorf("error formatting and encrypting volume: %w", err)
		}

		res.Formatted = true
	case "luks":
	default:
		return res, fmt.Errorf("%w: %s != %s", ErrTypeMismatch, v.Signature(), "luks")
	}

	logger.Info("opening encrypted volume")

	slot, failed, err := v.open(ctx, handlers, logger)
	if err != nil {
		return res, fmt.Errorf("error opening encrypted volume: %w", err)
	}

	res.Slot, res.FailedSyncs = slot, failed

	return res, nil
}

// formatAndEncrypt is Handler.FormatAndEncrypt: the first slot that makes
// a key formats the volume, every other slot is added.
func (v Volume) formatAndEncrypt(ctx context.Context, handlers []keyHandler, logger *zap.Logger) error {
	first, key, tok, err := tryHandlers(ctx, handlers, logger, func(ctx context.Context, kh keyHandler) ([]byte, *token, error) {
		return kh.newKey(ctx)
	})
	if err != nil {
		return err
	}

	if err := os.MkdirAll(v.Dir, 0o700); err != nil {
		return err
	}

	hdr := &header{Keyslots: map[string]keyslot{}, Tokens: map[string]*token{}}
	if err := hdr.setKey(first.slot(), key); err != nil {
		return err
	}

	if tok != nil {
		hdr.Tokens[strconv.Itoa(first.slot())] = tok
	}

	if err := v.writeHeader(hdr); err != nil {
		return err
	}

	if err := os.MkdirAll(v.Data(), 0o700); err != nil {
		return err
	}

	for _, kh := range handlers {
		if kh.slot() == first.slot() {
			continue
		}

		if err := v.addKey(ctx, kh); err != nil {
			return err
		}
	}

	return nil
}

// open is Handler.Open: the slots are tried in order until one's key
// opens the volume, then the others are synced.
func (v Volume) open(ctx context.Context, handlers []keyHandler, logger *zap.Logger) (int, []string, error) {
	used, _, _, err := tryHandlers(ctx, handlers, logger, func(ctx context.Context, kh keyHandler) ([]byte, *token, error) {
		hdr, err := v.readHeader()
		if err != nil {
			return nil, nil, err
		}

		tok := hdr.Tokens[strconv.Itoa(kh.slot())]

		key, err := kh.getKey(ctx, tok)
		if err != nil {
			return nil, nil, err
		}

		if !hdr.checkKey(kh.slot(), key) {
			return nil, nil, errors.New("no key available with this passphrase")
		}

		return key, tok, nil
	})
	if err != nil {
		return -1, nil, err
	}

	logger.Info("opened encrypted device", zap.Int("slot", used.slot()), zap.String("type", used.kind()))

	return used.slot(), v.syncKeys(ctx, handlers, used.slot(), logger), nil
}

// syncKeys is Handler.syncKeys: a configured slot that exists is checked
// (Unseal) and re-added when its key no longer opens it; a missing one is
// added (Seal); a slot no longer configured is removed.
func (v Volume) syncKeys(ctx context.Context, handlers []keyHandler, used int, logger *zap.Logger) []string {
	var failed []string

	visited := map[string]bool{}

	for _, kh := range handlers {
		slot := strconv.Itoa(kh.slot())
		visited[slot] = true

		if kh.slot() == used {
			continue
		}

		hdr, err := v.readHeader()
		if err != nil {
			failed = append(failed, err.Error())

			continue
		}

		if _, ok := hdr.Keyslots[slot]; ok {
			valid, err := v.checkKey(ctx, kh)
			if err == nil && !valid {
				err = v.addKey(ctx, kh)
			}

			if err != nil {
				logger.Error("failed to update key", zap.Int("slot", kh.slot()), zap.Error(err))
				failed = append(failed, fmt.Sprintf("error updating key slot %s %s: %s", slot, kh.kind(), err))
			}

			continue
		}

		if err := v.addKey(ctx, kh); err != nil {
			logger.Error("failed to add key", zap.Int("slot", kh.slot()), zap.Error(err))
			failed = append(failed, fmt.Sprintf("error adding key slot %s %s: %s", slot, kh.kind(), err))
		} else {
			logger.Info("added encryption key", zap.Int("slot", kh.slot()))
		}
	}

	hdr, err := v.readHeader()
	if err != nil {
		return append(failed, err.Error())
	}

	changed := false

	for slot := range hdr.Keyslots {
		if !visited[slot] {
			delete(hdr.Keyslots, slot)
			delete(hdr.Tokens, slot)

			changed = true

			logger.Info("removed encryption key", zap.String("slot", slot))
		}
	}

	if changed {
		if err := v.writeHeader(hdr); err != nil {
			failed = append(failed, err.Error())
		}
	}

	return failed
}

// checkKey is Handler.checkKey: an invalid token is an invalid key.
func (v Volume) checkKey(ctx context.Context, kh keyHandler) (bool, error) {
	hdr, err := v.readHeader()
	if err != nil {
		return false, err
	}

	key, err := kh.getKey(ctx, hdr.Tokens[strconv.Itoa(kh.slot())])
	if errors.Is(err, errTokenInvalid) {
		return false, nil
	}

	if err != nil {
		return false, err
	}

	return hdr.checkKey(kh.slot(), key), nil
}

// addKey is Handler.addKey: a new key (a Seal for a KMS slot) in the slot.
func (v Volume) addKey(ctx context.Context, kh keyHandler) error {
	key, tok, err := kh.newKey(ctx)
	if err != nil {
		return err
	}

	hdr, err := v.readHeader()
	if err != nil {
		return err
	}

	if err := hdr.setKey(kh.slot(), key); err != nil {
		return err
	}

	delete(hdr.Tokens, strconv.Itoa(kh.slot()))

	if tok != nil {
		hdr.Tokens[strconv.Itoa(kh.slot())] = tok
	}

	return v.writeHeader(hdr)
}

// tryHandlers calls cb for each slot in order, 20 s each, until one works.
func tryHandlers(
	ctx context.Context, handlers []keyHandler, logger *zap.Logger,
	cb func(context.Context, keyHandler) ([]byte, *token, error),
) (keyHandler, []byte, *token, error) {
	if len(handlers) == 0 {
		return nil, nil, nil, errors.New("no encryption keys found")
	}

	var errs []error

	for _, kh := range handlers {
		key, tok, err := func() ([]byte, *token, error) {
			ctx, cancel := context.WithTimeout(ctx, keyHandlerTimeout)
			defer cancel()

			return cb(ctx, kh)
		}()
		if err != nil {
			errs = append(errs, err)

			logger.Warn("failed to call key handler", zap.Int("slot", kh.slot()), zap.String("handler", kh.kind()), zap.Error(err))

			continue
		}

		return kh, key, tok, nil
	}

	return nil, nil, nil, fmt.Errorf("no handlers available to get encryption keys from: %w", errors.Join(errs...))
}

// header stands for the LUKS2 header.
type header struct {
	Keyslots map[string]keyslot `json:"keyslots"`
	Tokens   map[string]*token  `json:"tokens"`
}

// keyslot stands for a LUKS2 key slot: it verifies a passphrase.
type keyslot struct {
	Salt   []byte `json:"salt"`
	Digest []byte `json:"digest"`
}

// token is a LUKS2 token (luks.Token[*KMSToken]).
type token struct {
	Type     string     `json:"type"`
	UserData *kmsSealed `json:"user_data,omitempty"`
}

// kmsSealed is keys.KMSToken.
type kmsSealed struct {
	SealedData []byte `json:"sealedData"`
}

func digest(salt, passphrase []byte) []byte {
	h := sha256.New()
	h.Write(salt)
	h.Write(passphrase)

	return h.Sum(nil)
}

func (h *header) setKey(slot int, passphrase []byte) error {
	salt := make([]byte, digestSaltSize)
	if _, err := io.ReadFull(rand.Reader, salt); err != nil {
		return err
	}

	h.Keyslots[strconv.Itoa(slot)] = keyslot{Salt: salt, Digest: digest(salt, passphrase)}

	return nil
}

func (h *header) checkKey(slot int, passphrase []byte) bool {
	ks, ok := h.Keyslots[strconv.Itoa(slot)]

	return ok && subtle.ConstantTimeCompare(ks.Digest, digest(ks.Salt, passphrase)) == 1
}

func (v Volume) readHeader() (*header, error) {
	b, err := os.ReadFile(filepath.Join(v.Dir, HeaderFile))
	if err != nil {
		return nil, fmt.Errorf("reading the LUKS2 header of %s: %w", v.Label, err)
	}

	hdr := &header{}
	if err := json.Unmarshal(b, hdr); err != nil {
		return nil, fmt.Errorf("reading the LUKS2 header of %s: %w", v.Label, err)
	}

	if hdr.Keyslots == nil {
		hdr.Keyslots = map[string]keyslot{}
	}

	if hdr.Tokens == nil {
		hdr.Tokens = map[string]*token{}
	}

	return hdr, nil
}

func (v Volume) writeHeader(hdr *header) error {
	b, err := json.MarshalIndent(hdr, "", "  ")
	if err != nil {
		return err
	}

	tmp := filepath.Join(v.Dir, HeaderFile+".tmp")
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("writing the LUKS2 header of %s: %w", v.Label, err)
	}

	return os.Rename(tmp, filepath.Join(v.Dir, HeaderFile))
}

// SealedBlobs returns the sealed blob of each KMS slot of the partition in
// dir, by slot: what Talos keeps in the LUKS2 tokens.
func SealedBlobs(dir string) (map[int][]byte, error) {
	hdr, err := Volume{Label: filepath.Base(dir), Dir: dir}.readHeader()
	if err != nil {
		return nil, err
	}

	blobs := map[int][]byte{}

	for slot, tok := range hdr.Tokens {
		if tok == nil || tok.Type != TokenTypeKMS || tok.UserData == nil {
			continue
		}

		n, err := strconv.Atoi(slot)
		if err != nil {
			return nil, err
		}

		blobs[n] = tok.UserData.SealedData
	}

	return blobs, nil
}

// keyHandler is keys.Handler.
type keyHandler interface {
	slot() int
	kind() string
	newKey(ctx context.Context) ([]byte, *token, error)
	getKey(ctx context.Context, tok *token) ([]byte, error)
}

func newKeyHandler(k KeySpec, h Helpers) keyHandler {
	var kh keyHandler

	switch {
	case k.KMSEndpoint != "":
		kh = &kmsHandler{key: k, helpers: h}
	case k.Static != nil:
		kh = staticHandler(k)
	default:
		return unsupportedHandler(k)
	}

	if k.LockToState {
		return &saltedHandler{wrapped: kh, salt: h.Salt}
	}

	return kh
}

// saltedHandler is keys.SaltedHandler: the wrapped handler's key (after
// its KMS call, if any) suffixed with STATE's salt.
type saltedHandler struct {
	wrapped keyHandler
	salt    func(context.Context) ([]byte, error)
}

func (s *saltedHandler) slot() int    { return s.wrapped.slot() }
func (s *saltedHandler) kind() string { return s.wrapped.kind() + "+lockToState" }

func (s *saltedHandler) newKey(ctx context.Context) ([]byte, *token, error) {
	key, tok, err := s.wrapped.newKey(ctx)
	if err != nil {
		return key, tok, err
	}

	salt, err := s.getSalt(ctx)
	if err != nil {
		return nil, nil, err
	}

	return slices.Concat(key, salt), tok, nil
}

func (s *saltedHandler) getKey(ctx context.Context, tok *token) ([]byte, error) {
	key, err := s.wrapped.getKey(ctx, tok)
	if err != nil {
		return key, err
	}

	salt, err := s.getSalt(ctx)
	if err != nil {
		return nil, err
	}

	return slices.Concat(key, salt), nil
}

func (s *saltedHandler) getSalt(ctx context.Context) ([]byte, error) {
	if s.salt == nil {
		return nil, errors.New("failed to get disk encryption key salt: no salt")
	}

	salt, err := s.salt(ctx)
	if err != nil {
		return nil, fmt.Errorf("failed to get disk encryption key salt: %w", err)
	}

	return salt, nil
}

type staticHandler KeySpec

func (s staticHandler) slot() int    { return s.Slot }
func (s staticHandler) kind() string { return "static" }

func (s staticHandler) newKey(context.Context) ([]byte, *token, error) { return s.Static, nil, nil }

func (s staticHandler) getKey(context.Context, *token) ([]byte, error) { return s.Static, nil }

type unsupportedHandler KeySpec

func (u unsupportedHandler) slot() int    { return u.Slot }
func (u unsupportedHandler) kind() string { return u.Unsupported }

func (u unsupportedHandler) newKey(context.Context) ([]byte, *token, error) {
	return nil, nil, fmt.Errorf("%s keys are not simulated", u.Unsupported)
}

func (u unsupportedHandler) getKey(context.Context, *token) ([]byte, error) {
	return nil, fmt.Errorf("%s keys are not simulated", u.Unsupported)
}

// kmsHandler is keys.KMSKeyHandler.
type kmsHandler struct {
	key     KeySpec
	helpers Helpers
}

func (k *kmsHandler) slot() int    { return k.key.Slot }
func (k *kmsHandler) kind() string { return "kms" }

// newKey Seals 32 random bytes.
func (k *kmsHandler) newKey(ctx context.Context) ([]byte, *token, error) {
	ctx, cancel := context.WithTimeout(ctx, kmsTimeout)
	defer cancel()

	conn, err := k.conn()
	if err != nil {
		return nil, nil, fmt.Errorf("error dialing KMS endpoint %q: %w", k.key.KMSEndpoint, err)
	}
	defer conn.Close() //nolint:errcheck

	key := make([]byte, keySize)
	if _, err := io.ReadFull(rand.Reader, key); err != nil {
		return nil, nil, err
	}

	resp, err := kms.NewKMSServiceClient(conn).Seal(ctx, &kms.Request{NodeUuid: k.helpers.UUID, Data: key})
	if err != nil {
		return nil, nil, fmt.Errorf("failed to seal KMS passphrase, slot %d: %w", k.key.Slot, err)
	}

	tok := &token{Type: TokenTypeKMS, UserData: &kmsSealed{SealedData: resp.GetData()}}

	return passphrase(key), tok, nil
}

// getKey Unseals the token's blob.
func (k *kmsHandler) getKey(ctx context.Context, tok *token) ([]byte, error) {
	if tok == nil || tok.Type != TokenTypeKMS || tok.UserData == nil {
		return nil, errTokenInvalid
	}

	ctx, cancel := context.WithTimeout(ctx, kmsTimeout)
	defer cancel()

	conn, err := k.conn()
	if err != nil {
		return nil, fmt.Errorf("error dialing KMS endpoint %q: %w", k.key.KMSEndpoint, err)
	}
	defer conn.Close() //nolint:errcheck

	resp, err := kms.NewKMSServiceClient(conn).Unseal(ctx, &kms.Request{NodeUuid: k.helpers.UUID, Data: tok.UserData.SealedData})
	if err != nil {
		return nil, fmt.Errorf("failed to unseal KMS passphrase, slot %d: %w", k.key.Slot, err)
	}

	return passphrase(resp.GetData()), nil
}

// passphrase is what Talos gives LUKS for a KMS key: its base64.
func passphrase(key []byte) []byte { return []byte(base64.StdEncoding.EncodeToString(key)) }

// conn is KMSKeyHandler.getConn.
func (k *kmsHandler) conn() (*grpc.ClientConn, error) {
	ep, err := parseEndpoint(k.key.KMSEndpoint)
	if err != nil {
		return nil, err
	}

	var creds credentials.TransportCredentials

	if ep.insecure {
		creds = insecure.NewCredentials()
	} else {
		creds = credentials.NewTLS(&tls.Config{RootCAs: k.roots()}) //nolint:gosec // Talos's client: MinVersion as grpc sets it
	}

	rootsTLS := func() *tls.Config { return &tls.Config{RootCAs: k.roots()} } //nolint:gosec

	return grpc.NewClient(ep.host,
		grpc.WithTransportCredentials(creds),
		grpc.WithContextDialer(dialer.DynamicProxyDialerWithTLSConfig(rootsTLS)),
	)
}

func (k *kmsHandler) roots() *x509.CertPool {
	if k.helpers.Roots == nil {
		return nil
	}

	return k.helpers.Roots()
}

var urlScheme = regexp.MustCompile(`[a-zA-z]+://`)

type endpoint struct {
	host     string
	insecure bool
}

// parseEndpoint is endpoint.Parse.
func parseEndpoint(s string) (endpoint, error) {
	if !urlScheme.MatchString(s) {
		s = "grpc://" + s
	}

	u, err := url.Parse(s)
	if err != nil {
		return endpoint{}, err
	}

	ep := endpoint{host: u.Host, insecure: u.Scheme == "grpc"}

	if u.Port() == "" && u.Scheme == "https" {
		ep.host += ":443"
	}

	return ep, nil
}
