// Package discovery holds the resources of peer discovery: each verified
// Talos peer, and the summary of each discovery round that the election reads.
package discovery

import "github.com/cosi-project/runtime/pkg/resource"

// NamespaceName is the namespace of the discovery resources.
const NamespaceName resource.Namespace = "discovery"
