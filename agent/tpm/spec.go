package tpm

import (
	"fmt"
	"io"
	"strings"

	"github.com/sovra-dev/sovra/agent/tpm/device"
	"github.com/sovra-dev/sovra/agent/tpm/swtpm"
)

// Opener opens a TPM command channel; it satisfies agent/attest.TPM.
type Opener interface {
	Open() (io.ReadWriteCloser, error)
}

// FromSpec returns the TPM a flag names:
//
//	""  or "device"        the kernel device (/dev/tpmrm0, else /dev/tpm0)
//	"device:/dev/tpm0"     that device path only
//	"swtpm:HOST:PORT"      swtpm's TCP data channel
//
// The simulator is not selectable: it exists only in tests.
func FromSpec(spec string) (Opener, error) {
	kind, arg, _ := strings.Cut(spec, ":")
	switch kind {
	case "", "device":
		if arg == "" {
			return device.Device{}, nil
		}
		return device.Device{Paths: []string{arg}}, nil
	case "swtpm":
		if arg == "" {
			return nil, fmt.Errorf("TPM %q: swtpm needs an address, as in swtpm:127.0.0.1:2321", spec)
		}
		return swtpm.TCP{Addr: arg}, nil
	default:
		return nil, fmt.Errorf("TPM %q: want device, device:PATH or swtpm:HOST:PORT", spec)
	}
}
