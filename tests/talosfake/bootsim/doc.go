// Package bootsim simulates a Talos machine's life, each behaviour checked
// against Talos's source, for the end-to-end stories: it boots, opens STATE
// with the KMS settings META keeps, acquires its configuration (STATE, an
// embedded configuration, then the talos.config= URL with its variables),
// validates it with the machinery config loader, creates and opens STATE
// and EPHEMERAL with the upstream KMS client (Seal on a new volume, then
// Unseal, retried every 30 s while the KMS refuses), persists the
// configuration in STATE, serves the Talos API (package talosfake) with
// the configuration's PKI behind its ingress firewall, runs the installed
// extension services in containers with their ExtensionServiceConfig
// (package container), and applies ApplyConfiguration, Reboot and Reset:
// a reboot is a new boot (new boot ID and time) from the disks.
//
// Talos sources imitated (siderolabs/talos v1.13.9):
//   - internal/app/machined/pkg/runtime/v1alpha1/v1alpha1_sequencer.go
//     (boot, reboot and reset sequences) and v1alpha1_sequencer_tasks.go
//     (ResetSystemDisk, ResetSystemDiskSpec: a STATE wipe drops META tag
//     0x09 unless META is wiped too);
//   - internal/app/machined/pkg/controllers/config/acquire.go (sources and
//     their order, validation modes, the controller restarting on a refused
//     configuration) and config/persistence.go (config.yaml in STATE);
//   - internal/app/machined/pkg/controllers/block/volume_config.go
//     (setupStateEncryption: STATE's encryption in META 0x09),
//     block/internal/volumes/volumeconfig/system_volumes.go
//     (manageStateNoConfig: STATE opened from META before any config),
//     block/volume_manager.go (the 30 s retry);
//   - internal/app/machined/pkg/controllers/secrets/encryption_salt.go
//     (STATE's encryption-salt.yaml, for keys locked to STATE);
//   - internal/app/machined/pkg/controllers/secrets/root.go, api.go,
//     api_cert_sans.go, trustd.go (the API's PKI: a control plane issues
//     from machine.ca, a worker asks trustd; its SANs);
//   - internal/app/machined/pkg/controllers/secrets/trusted_roots.go and
//     pkg/httpdefaults (the trusted roots: built-in plus TrustedRootsConfig
//     of the configuration in force; none of it before a configuration);
//   - internal/app/machined/pkg/controllers/network/nftables_chain_config.go
//     (the ingress firewall);
//   - internal/app/machined/internal/server/v1alpha1/v1alpha1_server.go
//     (ApplyConfiguration modes, Reboot, Reset) and
//     internal/app/machined/pkg/runtime/v1alpha1/v1alpha1_runtime.go
//     (CanApplyImmediate);
//   - internal/app/machined/pkg/system/services/extension.go,
//     controllers/runtime/extension_service.go and
//     extension_service_config_files.go, internal/pkg/environment (how an
//     extension service starts: dependencies, mounts, config files
//     read-only at their mountPath, environment, restart policy, restart on
//     a changed ExtensionServiceConfig);
//   - internal/app/machined/pkg/controllers/hardware, k8s/static_endpoint.go
//     (resources a client reads).
//
// Not imitated: maintenance mode's API (a machine with no configuration
// waits), talos.config.early/inline, the OAuth2 flow, user volumes,
// upgrades, kexec, etcd and Kubernetes; extensions start once EPHEMERAL is
// ready (in Talos they race the volumes); a whole-disk reset of a machine
// that booted a disk image keeps Talos installed.
package bootsim
