package attest

import (
	"testing"

	agentattest "github.com/sovra-dev/sovra/agent/attest"
	"github.com/sovra-dev/sovra/agent/tpm/swtpm"
	"github.com/sovra-dev/sovra/tests/swtpmlab"
)

// lab provides the TPMs of a story: TPM 0 is the node under test, TPM 1 is
// another machine (an attacker's, or a second node).
type lab interface {
	// use makes TPM i current, booting it when it was off, and returns it
	// with the path of its event log. Only the current TPM may be used.
	use(t *testing.T, i int) (agentattest.TPM, string)
	// ekFlags are sovrad's flags of the lab's EK policy: it admits TPM 0
	// and not TPM 1 when TPM 1 presents no certificate.
	ekFlags(t *testing.T) []string
	// ekCertificates reports whether the lab's TPMs hold EK certificates.
	ekCertificates() bool
	// restore makes TPM 0 current again and reports whether that rebooted
	// it into a state where its AKs no longer load (then the node re-enrolls).
	restore(t *testing.T) bool
}

// swtpmLab is two swtpm instances in socket mode, manufactured by
// swtpm_setup with EK certificates from one local CA (tests/swtpmlab).
type swtpmLab struct {
	*swtpmlab.Lab
}

func newSwtpmLab(t *testing.T) *swtpmLab {
	return &swtpmLab{swtpmlab.New(t, 2, "127.0.0.1")}
}

func (l *swtpmLab) use(_ *testing.T, i int) (agentattest.TPM, string) {
	return swtpm.TCP{Addr: l.TPMs[i].Addr}, l.TPMs[i].EventLog
}
func (l *swtpmLab) ekCertificates() bool    { return true }
func (l *swtpmLab) restore(*testing.T) bool { return false }

// ekFlags trust the local CA: its root, with its issuing CA as intermediate.
func (l *swtpmLab) ekFlags(*testing.T) []string {
	return []string{"--ek-roots", l.Roots(), "--ek-intermediates", l.Intermediates()}
}
