// Package hosts runs sovra's pool of machines and its metadata service.
//
// A machine that booted the enrollment configuration runs the agent in host
// mode: it enrolls, attests, and calls HostService.Sync with the node
// credential of that boot, reporting what it runs and its hardware. The first
// Sync makes it a Host (named after its SovraNode): Pending until an operator
// (or, with AutoAccept, the daemon's policy) accepts it, then Available. The
// infrastructure provider (package daemon/capi/infra) claims an Available
// host for a SovraMachine by writing the Host's consumerRef. Sync then
// releases the Machine's configuration (its bootstrap data merged with what
// sovra needs on the node, package machineconfig) to the credential of the
// claimed host's current record and boot, after a passing attestation no
// older than MaxAttestationAge; the agent applies it and reboots, and its next
// Sync reports the generation it runs: Provisioned. A released host is told to
// wipe itself and returns to the pool once it attests on the enrollment
// configuration again. Every release and refusal is an event and a log line,
// never the configuration's content.
package hosts

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/machineconfig"
	"github.com/sovra-dev/sovra/internal/hostapi"
)

// Defaults and limits.
const (
	// DefaultMaxAttestationAge is how old the attestation a configuration
	// is released on may be.
	DefaultMaxAttestationAge = 15 * time.Minute
	// waitRetry is how soon an agent that waits syncs again; steadyRetry
	// how soon one that runs what it should.
	waitRetry   = 5 * time.Second
	steadyRetry = time.Minute
	// syncWriteEvery bounds how often an unchanged host's lastSync is written.
	syncWriteEvery = time.Minute
	// agentCASecretPrefix names the Secret of a host's agent CA in
	// Namespace: <prefix><host>.
	agentCASecretPrefix = "host-agent-ca-"
	// Namespace holds sovra's Secrets.
	Namespace = "sovra-system"
	// clusterSecretsSuffix and clusterSecretsKey name the secrets bundle the
	// Talos bootstrap provider keeps per cluster (<cluster>-talos, "bundle").
	clusterSecretsSuffix = "-talos"
	clusterSecretsKey    = "bundle"
	// talosControlPlaneKind owns a Talos control plane's Machines.
	talosControlPlaneKind = "TalosControlPlane"
	// bytesPerGiB and bytesPerMiB convert the reported sizes.
	bytesPerGiB = 1 << 30
	bytesPerMiB = 1 << 20
)

// Modes a host reports.
const (
	ModeEnrollment = "enrollment"
	ModeConfigured = "configured"
)

// Event and condition reasons.
const (
	ReasonConfigReleased = "ConfigReleased"
	ReasonConfigRefused  = "ConfigRefused"
	ReasonHostReleased   = "HostReleased"
	ReasonHostReturned   = "HostReturned"
	ReasonHostFailed     = "HostFailed"
	ReasonAccepted       = "HostAccepted"
	// Why a configuration was refused (metrics and log lines).
	reasonAttestationTooOld = "AttestationTooOld"
	reasonAttestationFailed = "AttestationFailed"
	reasonNotAttested       = "NotAttested"
	reasonConfigInvalid     = "ConfigInvalid"
	reasonNotAccepted       = "NotAccepted"
)

// ErrNotReady is why a claimed host cannot get its configuration yet.
var ErrNotReady = errors.New("not ready")

// Config configures the pool and its metadata service.
type Config struct {
	// Daemon is how machines reach sovrad (the node API, its CA).
	Daemon machineconfig.Daemon
	// MaxAttestationAge bounds the age of the attestation a configuration
	// is released on; zero means DefaultMaxAttestationAge.
	MaxAttestationAge time.Duration
	// AutoAccept accepts a new host whose EK was admitted by a certificate
	// or the allow-list (not trust on first use) and whose last attestation
	// passed at least one AttestationPolicy.
	AutoAccept bool
}

// Validate reports every problem of c at once.
func (c Config) Validate() error {
	var errs []error
	if err := c.Daemon.Validate(); err != nil {
		errs = append(errs, err)
	}
	if c.MaxAttestationAge < 0 {
		errs = append(errs, errors.New("the attestation age of a release is negative"))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("invalid host pool config: %w", err)
	}
	return nil
}

func (c Config) withDefaults() Config {
	if c.MaxAttestationAge == 0 {
		c.MaxAttestationAge = DefaultMaxAttestationAge
	}
	return c
}

// ProviderID is the provider ID of the machine a host serves.
func ProviderID(host string) string { return "sovra://" + host }

// hardwareLabels are the labels of a host's hardware, for host selectors.
func hardwareLabels(hw *hostapi.Hardware) map[string]string {
	if hw == nil {
		return nil
	}
	out := map[string]string{}
	if hw.GetArchitecture() != "" {
		out[v1alpha1.LabelHostArch] = hw.GetArchitecture()
	}
	out[v1alpha1.LabelHostCPUs] = strconv.FormatUint(uint64(hw.GetCpus()), 10)
	out[v1alpha1.LabelHostMemory] = strconv.FormatUint(hw.GetMemoryBytes()/bytesPerGiB, 10)
	out[v1alpha1.LabelHostDisks] = strconv.Itoa(len(hw.GetDisks()))
	var largest uint64
	for _, d := range hw.GetDisks() {
		largest = max(largest, d.GetSizeBytes())
	}
	out[v1alpha1.LabelHostDiskSize] = strconv.FormatUint(largest/bytesPerGiB, 10)
	return out
}

// hardwareStatus converts the reported hardware.
func hardwareStatus(hw *hostapi.Hardware) *v1alpha1.HostHardware {
	if hw == nil {
		return nil
	}
	out := &v1alpha1.HostHardware{
		Architecture: hw.GetArchitecture(), CPUs: int32(hw.GetCpus()), MemoryMiB: int64(hw.GetMemoryBytes() / bytesPerMiB),
	}
	for i, d := range hw.GetDisks() {
		if i == maxDisks {
			break
		}
		out.Disks = append(out.Disks, v1alpha1.HostDisk{Name: d.GetName(), SizeBytes: int64(d.GetSizeBytes()), Model: d.GetModel()})
	}
	return out
}

// maxDisks bounds the disks a host reports (the CRD's limit).
const maxDisks = 64

// bootstrapHash names a Machine's bootstrap data: a new hash is a new
// generation of the host's configuration.
func bootstrapHash(data []byte) string {
	sum := sha256.Sum256(data)
	return hex.EncodeToString(sum[:])
}

// attestationRefusal says why no configuration is released on rec's
// attestation at now (reason and message), or "" when one may be: its last
// attestation failed, or none passed since it enrolled, or its last passing
// one is older than maxAge.
func attestationRefusal(rec *v1alpha1.SovraNode, now time.Time, maxAge time.Duration) (reason, msg string) {
	at := rec.Status.LastAttestationTime
	switch {
	case rec.Status.LastAttestationResult == v1alpha1.ResultFailed:
		return reasonAttestationFailed, fmt.Sprintf("the host's last attestation failed (%s): a configuration is released only to a passing attestation", rec.Status.Reason)
	case !rec.AttestedOK() || at == nil:
		return reasonNotAttested, "the host has not attested since it enrolled: a configuration is released only to a passing attestation"
	case now.Sub(at.Time) > maxAge:
		return reasonAttestationTooOld, fmt.Sprintf("the host's last passing attestation is older than %s: attest again", maxAge)
	}
	return "", ""
}
