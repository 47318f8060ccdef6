//go:build tpmsimulator

package attest

import (
	"crypto/sha256"
	"encoding/hex"
	"io"
	"os"
	"path/filepath"
	"testing"

	agentattest "github.com/sovra-dev/sovra/agent/attest"
	"github.com/sovra-dev/sovra/agent/tpm/simulator"
	"github.com/sovra-dev/sovra/tests/swtpmlab"
)

// simLab runs one reference simulator at a time; TPM i has seed i+1, so
// switching TPMs reboots into another machine (and back: the seeds make the
// same EK and SRK, so an AK made before still loads).
type simLab struct {
	t    *testing.T
	cur  int
	sim  *simulator.Simulator
	dirs [2]string
	logs [2]string
}

func newSimLab(t *testing.T) *simLab {
	l := &simLab{t: t, cur: -1, dirs: [2]string{t.TempDir(), t.TempDir()}}
	t.Cleanup(func() {
		if l.sim != nil {
			l.sim.Close()
		}
	})
	return l
}

// simTPM is TPM i of the lab; opening it switches the lab to it.
type simTPM struct {
	l *simLab
	i int
}

func (s simTPM) Open() (io.ReadWriteCloser, error) {
	s.l.switchTo(s.i)
	return s.l.sim.Open()
}

func (l *simLab) switchTo(i int) {
	if l.cur == i {
		return
	}
	if l.sim != nil {
		l.sim.Close()
	}
	sim, err := simulator.New(int64(i + 1))
	if err != nil {
		l.t.Fatal(err)
	}
	l.sim, l.cur = sim, i
	l.logs[i] = swtpmlab.Boot(l.t, sim, l.dirs[i])
}

func (l *simLab) use(t *testing.T, i int) (agentattest.TPM, string) {
	l.switchTo(i)
	return simTPM{l, i}, l.logs[i]
}

func (l *simLab) ekCertificates() bool { return false }

// restore switches back to TPM 0: a new simulator whose storage hierarchy
// no longer loads the AKs made before, so the node must enroll again.
func (l *simLab) restore(*testing.T) bool {
	if l.cur == 0 {
		return false
	}
	l.switchTo(0)
	return true
}

// ekFlags allow-list TPM 0's EK (the simulator has no EK certificate) and
// trust a manufacturer root that signed nothing, so certificates are checked.
func (l *simLab) ekFlags(t *testing.T) []string {
	tpm, _ := l.use(t, 0)
	k, err := agentattest.NewKey(tpm)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(k.EKPublic)
	allow := filepath.Join(t.TempDir(), "ek-allow-list")
	if err := os.WriteFile(allow, []byte(hex.EncodeToString(sum[:])+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	root, _ := newCA(t, "TPM manufacturer root")
	return []string{"--ek-allow-list", allow, "--ek-roots", writePEM(t, root)}
}

func TestSimulatorStory(t *testing.T) {
	runStory(t, newSimLab(t))
}
