// Package metalurl imitates how Talos's metal platform fetches the machine
// configuration named by the talos.config= kernel argument: the variables
// ${uuid}, ${serial}, ${mac}, ${hostname} and ${code} are substituted only
// inside query parameter values (and a legacy empty ?uuid= is filled), each
// once its value appears in the machine's COSI state; the download is
// retried exponentially for three hours, with three minutes per attempt,
// for transport errors and answers other than 200; TLS is verified against
// the machine's roots.
//
// Talos sources imitated (siderolabs/talos v1.13.9):
//   - internal/app/machined/pkg/runtime/v1alpha1/platform/metal/metal.go
//     (Configuration: none, the URL populated per attempt with half the
//     attempt's time, the download options);
//   - internal/app/machined/pkg/runtime/v1alpha1/platform/metal/url/url.go,
//     variable.go, value.go (the variables, where they match, where their
//     values come from, the query re-encoded);
//   - pkg/download/download.go (retries, which errors are retried, 204,
//     the file scheme);
//   - pkg/httpdefaults (the roots, the proxy from the environment).
//
// Not imitated: the OAuth2 device flow (talos.config.oauth.*), the tftp
// scheme, metal-iso, and the wait for network readiness (the simulated
// machine's network is up when it boots).
package metalurl

import (
	"context"
	"fmt"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"sync"

	"github.com/cosi-project/runtime/pkg/state"
	"github.com/siderolabs/talos/pkg/machinery/constants"
	"github.com/siderolabs/talos/pkg/machinery/meta"
	"github.com/siderolabs/talos/pkg/machinery/resources/hardware"
	"github.com/siderolabs/talos/pkg/machinery/resources/network"
	"github.com/siderolabs/talos/pkg/machinery/resources/runtime"
	"go.uber.org/zap"
)

// Variable is a variable of the download URL (url/variable.go).
type Variable struct {
	// Key is the variable's name.
	Key string
	// MatchOnArg also matches a query argument named Key with an empty
	// value (the legacy ?uuid=).
	MatchOnArg bool
	// Value is where the value comes from.
	Value *Value

	re *regexp.Regexp
}

// Variables returns every supported variable, fresh (values are filled as
// they are watched).
func Variables() []*Variable {
	vars := []*Variable{
		{Key: constants.UUIDKey, MatchOnArg: true, Value: systemInformation(func(s *hardware.SystemInformationSpec) string { return s.UUID })},
		{Key: constants.SerialNumberKey, Value: systemInformation(func(s *hardware.SystemInformationSpec) string { return s.SerialNumber })},
		{Key: constants.MacKey, Value: &Value{
			watch: func(ctx context.Context, st state.State, ch chan<- state.Event) error {
				return st.Watch(ctx, network.NewHardwareAddr(network.NamespaceName, network.FirstHardwareAddr).Metadata(), ch)
			},
			extract: func(ev state.Event) string {
				if hw, ok := ev.Resource.(*network.HardwareAddr); ok {
					return hw.TypedSpec().HardwareAddr.String()
				}

				return ""
			},
		}},
		{Key: constants.HostnameKey, Value: &Value{
			watch: func(ctx context.Context, st state.State, ch chan<- state.Event) error {
				return st.Watch(ctx, network.NewHostnameStatus(network.NamespaceName, network.HostnameID).Metadata(), ch)
			},
			extract: func(ev state.Event) string {
				if h, ok := ev.Resource.(*network.HostnameStatus); ok {
					return h.TypedSpec().Hostname
				}

				return ""
			},
		}},
		{Key: constants.CodeKey, Value: &Value{
			watch: func(ctx context.Context, st state.State, ch chan<- state.Event) error {
				return st.Watch(ctx, runtime.NewMetaKey(runtime.NamespaceName, runtime.MetaKeyTagToID(meta.DownloadURLCode)).Metadata(), ch)
			},
			extract: func(ev state.Event) string {
				if k, ok := ev.Resource.(*runtime.MetaKey); ok {
					return k.TypedSpec().Value
				}

				return ""
			},
		}},
	}

	for _, v := range vars {
		v.re = regexp.MustCompile(`(?i)` + regexp.QuoteMeta("${"+v.Key+"}"))
	}

	return vars
}

func systemInformation(field func(*hardware.SystemInformationSpec) string) *Value {
	return &Value{
		watch: func(ctx context.Context, st state.State, ch chan<- state.Event) error {
			return st.Watch(ctx, hardware.NewSystemInformation(hardware.SystemInformationID).Metadata(), ch)
		},
		extract: func(ev state.Event) string {
			if si, ok := ev.Resource.(*hardware.SystemInformation); ok {
				return field(si.TypedSpec())
			}

			return ""
		},
	}
}

// Value is a variable's value, read from the resource it watches.
type Value struct {
	watch   func(ctx context.Context, st state.State, ch chan<- state.Event) error
	extract func(ev state.Event) string

	// mu guards val.
	mu  sync.Mutex
	val string
}

// Get returns the value; empty until it was seen.
func (v *Value) Get() string {
	v.mu.Lock()
	defer v.mu.Unlock()

	return v.val
}

// handle takes the value from ev; an empty value is not ready yet.
func (v *Value) handle(ev state.Event) bool {
	val := v.extract(ev)
	if val == "" {
		return false
	}

	v.mu.Lock()
	v.val = val
	v.mu.Unlock()

	return true
}

// matches reports whether the variable appears in query.
func (v *Variable) matches(query url.Values) bool {
	for arg, values := range query {
		if v.MatchOnArg && arg == v.Key && !(len(values) == 1 && strings.TrimSpace(values[0]) != "") {
			return true
		}

		if slices.ContainsFunc(values, v.re.MatchString) {
			return true
		}
	}

	return false
}

// replace substitutes the value into query.
func (v *Variable) replace(query url.Values) {
	for arg, values := range query {
		if v.MatchOnArg && arg == v.Key && !(len(values) == 1 && strings.TrimSpace(values[0]) != "") {
			query.Set(arg, v.Value.Get())

			continue
		}

		for i, value := range values {
			values[i] = v.re.ReplaceAllString(value, v.Value.Get())
		}

		query[arg] = values
	}
}

// Populate returns downloadURL with the variables in its query values
// replaced by their values from st, waiting until every variable used has a
// value or ctx ends. When ctx ends first, it returns the URL with the
// values it has and ctx's error (Talos then fetches that URL as it is). A
// URL without variables is returned unchanged; one with variables has its
// query re-encoded (sorted by key, as url.Values.Encode does).
func Populate(ctx context.Context, downloadURL string, st state.State, logger *zap.Logger) (string, error) {
	u, err := url.Parse(downloadURL)
	if err != nil {
		return "", fmt.Errorf("failed to parse URL: %w", err)
	}

	query := u.Query()

	var active []*Variable

	for _, v := range Variables() {
		if v.matches(query) {
			active = append(active, v)
		}
	}

	if len(active) == 0 {
		return downloadURL, nil
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	events := make(chan state.Event)

	for _, v := range active {
		if err := v.Value.watch(ctx, st, events); err != nil {
			return "", fmt.Errorf("error watching variable %q: %w", v.Key, err)
		}
	}

	pending := map[*Variable]bool{}
	for _, v := range active {
		pending[v] = true
	}

	for len(pending) > 0 {
		var keys []string
		for v := range pending {
			keys = append(keys, v.Key)
		}

		logger.Info("waiting for URL variables", zap.Strings("variables", keys))

		var ev state.Event

		select {
		case <-ctx.Done():
			u.RawQuery = query.Encode()

			return u.String(), ctx.Err()
		case ev = <-events:
		}

		switch ev.Type {
		case state.Errored:
			return "", fmt.Errorf("error watching variables: %w", ev.Error)
		case state.Bootstrapped, state.Noop:
		case state.Created, state.Updated, state.Destroyed:
			handled := false

			for _, v := range active {
				if v.Value.handle(ev) {
					delete(pending, v)

					handled = true
				}
			}

			if !handled {
				continue
			}

			query = u.Query()

			for _, v := range active {
				if !pending[v] {
					v.replace(query)
				}
			}
		}
	}

	u.RawQuery = query.Encode()

	return u.String(), nil
}
