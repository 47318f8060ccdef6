package tpm

import (
	"testing"

	"github.com/sovra-dev/sovra/agent/tpm/device"
	"github.com/sovra-dev/sovra/agent/tpm/swtpm"
)

func TestFromSpec(t *testing.T) {
	for spec, want := range map[string]Opener{
		"":                 device.Device{},
		"device":           device.Device{},
		"swtpm:10.0.0.1:1": swtpm.TCP{Addr: "10.0.0.1:1"},
	} {
		got, err := FromSpec(spec)
		if err != nil || got == nil {
			t.Fatalf("FromSpec(%q) = %v, %v", spec, got, err)
		}
		if s, ok := want.(swtpm.TCP); ok && got.(swtpm.TCP) != s {
			t.Errorf("FromSpec(%q) = %+v", spec, got)
		}
	}
	if d, _ := FromSpec("device:/dev/tpm0"); d.(device.Device).Paths[0] != "/dev/tpm0" {
		t.Errorf("device path not used: %+v", d)
	}
	for _, bad := range []string{"swtpm", "simulator", "tpm:x"} {
		if _, err := FromSpec(bad); err == nil {
			t.Errorf("FromSpec(%q) accepted", bad)
		}
	}
}
