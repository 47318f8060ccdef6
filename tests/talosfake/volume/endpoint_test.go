package volume

import "testing"

// TestParseEndpoint: endpoint.Parse's rules for a KMS endpoint.
func TestParseEndpoint(t *testing.T) {
	for in, want := range map[string]endpoint{
		"10.0.0.1:4050":         {host: "10.0.0.1:4050", insecure: true},
		"grpc://kms:4050":       {host: "kms:4050", insecure: true},
		"https://kms":           {host: "kms:443"},
		"https://kms:7443/path": {host: "kms:7443"},
		"grpcs://kms":           {host: "kms"},
	} {
		got, err := parseEndpoint(in)
		if err != nil || got != want {
			t.Errorf("%s: %+v %v, want %+v", in, got, err, want)
		}
	}
}
