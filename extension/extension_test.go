package extension

import (
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/extensions"
	"go.yaml.in/yaml/v4"
)

func TestManifestRendersVersion(t *testing.T) {
	b, err := Manifest("v1.2.3-4-gabc")
	if err != nil {
		t.Fatal(err)
	}

	var m extensions.Manifest
	if err := yaml.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}

	if m.Version != "v1alpha1" || m.Metadata.Name != Name || m.Metadata.Version != "v1.2.3-4-gabc" ||
		m.Metadata.Compatibility.Talos.Version == "" {
		t.Fatalf("manifest %+v", m)
	}
}

func TestServiceSpecIsValidForTalos(t *testing.T) {
	spec, err := DecodeServiceSpec(ServiceSpec())
	if err != nil {
		t.Fatal(err)
	}

	if spec.Name != Name || spec.Container.Entrypoint != "./"+Name {
		t.Fatalf("spec %+v", spec)
	}
}

func TestImageRefusesWrongBinaries(t *testing.T) {
	// /bin/true is dynamically linked, and of the host's architecture only.
	if _, err := Image(runtime.GOARCH, "/bin/true", "v0", time.Unix(0, 0)); err == nil || !strings.Contains(err.Error(), "dynamically linked") {
		t.Errorf("dynamic binary: %v", err)
	}

	other := map[string]string{"amd64": "arm64", "arm64": "amd64"}[runtime.GOARCH]
	if _, err := Image(other, "/bin/true", "v0", time.Unix(0, 0)); err == nil || !strings.Contains(err.Error(), "is built for") {
		t.Errorf("%s image around a %s binary: %v", other, runtime.GOARCH, err)
	}
}
