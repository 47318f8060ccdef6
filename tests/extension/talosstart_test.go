package extension_test

import (
	"slices"
	"strings"
	"testing"

	"github.com/siderolabs/talos/pkg/machinery/extensions/services"

	"github.com/sovra-dev/sovra/extension"
)

// everywhere are the host paths that exist on every Talos machine, UEFI or
// BIOS, with or without a TPM, and why (Talos v1.13).
var everywhere = map[string]string{
	"/dev":                 "devtmpfs, mounted by internal/pkg/mount/v3/helpers.go Pseudo",
	"/sys/firmware":        "sysfs: the kernel's firmware directory exists on every machine",
	"/sys/kernel/security": "securityfs, mounted always by internal/pkg/mount/v3/helpers.go PseudoSub",
}

// creatable is where Talos can create a missing mount source: (*Extension).Runner
// makes it with os.MkdirAll, which works on /var (the EPHEMERAL volume) and
// fails in sysfs.
const creatable = "/var/"

// containerdMaskedPaths are containerd's default masked paths
// (pkg/oci/spec.go, populateDefaultUnixSpec), which Talos keeps unless the
// spec sets security.maskedPaths ((*Extension).getOCIOptions).
var containerdMaskedPaths = []string{
	"/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
	"/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/sys/devices/virtual/powercap", "/proc/scsi",
}

// checkStartsEverywhere applies what Talos does with an extension service
// spec (internal/app/machined/pkg/system/services/extension.go) to ours, on
// a machine without a TPM or UEFI: no dependency on a path (Condition waits
// for it forever), every mount source there or creatable (Runner creates a
// missing one, and fails where it cannot), and no masked path hiding a
// mount (runc masks after mounting).
func checkStartsEverywhere(t *testing.T, spec services.Spec) {
	t.Helper()

	for _, d := range spec.Depends {
		if d.Path != "" {
			t.Errorf("depends on path %s: Talos waits for it forever on a machine without it", d.Path)
		}
	}

	if spec.Container.EnvironmentFile != "" {
		t.Errorf("environmentFile %s: Talos waits for it forever", spec.Container.EnvironmentFile)
	}

	for _, m := range spec.Container.Mounts {
		if _, ok := everywhere[m.Source]; ok {
			continue
		}

		if !strings.HasPrefix(m.Source, creatable) {
			t.Errorf("mount source %s is not on every Talos machine, and Talos cannot create it", m.Source)
		}
	}

	masked := spec.Container.Security.MaskedPaths
	if masked == nil {
		masked = containerdMaskedPaths
	}

	for _, mp := range masked {
		for _, m := range spec.Container.Mounts {
			if m.Destination == mp || strings.HasPrefix(m.Destination, mp+"/") {
				t.Errorf("masked path %s hides the mount at %s", mp, m.Destination)
			}
		}
	}

	// The rest of containerd's masks stay.
	for _, mp := range containerdMaskedPaths {
		if mp != "/sys/firmware" && !slices.Contains(masked, mp) {
			t.Errorf("masked paths %v drop containerd's %s", masked, mp)
		}
	}
}

func TestServiceSpecStartsEverywhere(t *testing.T) {
	spec, err := extension.DecodeServiceSpec(extension.ServiceSpec())
	if err != nil {
		t.Fatal(err)
	}

	checkStartsEverywhere(t, spec)
}
