// Package identity registers workloads with SPIRE: it is the only package
// that imports spire-api-sdk.
//
// meshkeeper writes one registration entry per meshed namespace and service
// account, spiffe://<trustDomain>/ns/<ns>/sa/<sa>, selected by k8s:ns and
// k8s:sa, parented to one node alias entry that every agent of the cluster
// resolves to (k8s_psat:cluster:<cluster>). Every entry it writes carries an
// ownership mark it can prove: its entry ID is an HMAC of the entry's SPIFFE
// ID and parent ID under the owner key (the Mesh's UID). An entry whose ID is
// not exactly that is foreign, whatever it selects or is called, and is never
// updated or deleted.
//
// The package is split as the rest of meshkeeper is: Desired computes the
// entries the cluster needs, Decide (pure) compares them with what the
// server holds and returns a Plan, and Apply executes a Plan through a Server,
// handling each entry's result of a batch call on its own.
package identity

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
)

// IDPrefix starts the entry ID of every entry meshkeeper writes. The prefix
// alone proves nothing (anyone may choose an ID): ownership is the whole ID
// matching Owner.ID.
const IDPrefix = "meshkeeper."

// ClusterName is the cluster name spire-agents present in their k8s_psat
// node attestation (the spire-server and spire-agent charts' clusterName).
const ClusterName = "meshkeeper"

// Selector types and the SPIFFE ID paths meshkeeper uses.
const (
	selectorNamespace      = "k8s:ns:"
	selectorServiceAccount = "k8s:sa:"
	selectorPSATCluster    = "k8s_psat:cluster:"
)

// Entry is one SPIRE registration entry, as meshkeeper compares them.
// Selectors are "type:value" strings, sorted.
type Entry struct {
	ID        string
	SPIFFEID  string
	ParentID  string
	Selectors []string
	// X509TTL is the X.509 SVID lifetime in seconds; 0 is the server's default.
	X509TTL int32
	// Other says the entry sets fields meshkeeper never sets (admin,
	// downstream, DNS names, federation, hint, ...); only foreign entries do.
	Other bool
}

func (e Entry) String() string { return e.SPIFFEID }

// sameSpec is true when two entries would issue the same SVIDs to the same
// workloads.
func (e Entry) sameSpec(o Entry) bool {
	return e.SPIFFEID == o.SPIFFEID && e.ParentID == o.ParentID && e.X509TTL == o.X509TTL &&
		slices.Equal(e.Selectors, o.Selectors) && !o.Other
}

// Owner proves which entries are meshkeeper's.
type Owner struct {
	key []byte
}

// NewOwner makes the ownership mark from a stable key (the Mesh's UID).
func NewOwner(key string) Owner {
	return Owner{key: []byte(key)}
}

// ID is the entry ID meshkeeper gives the entry with this SPIFFE ID and
// parent.
func (o Owner) ID(spiffeID, parentID string) string {
	m := hmac.New(sha256.New, o.key)
	m.Write([]byte(spiffeID))
	m.Write([]byte{0})
	m.Write([]byte(parentID))
	return IDPrefix + hex.EncodeToString(m.Sum(nil)[:16])
}

// Owns is true for an entry meshkeeper wrote: its ID is the mark computed
// from its own SPIFFE ID and parent.
func (o Owner) Owns(e Entry) bool {
	return strings.HasPrefix(e.ID, IDPrefix) && hmac.Equal([]byte(e.ID), []byte(o.ID(e.SPIFFEID, e.ParentID)))
}

// Workload is one service account of a meshed namespace.
type Workload struct {
	Namespace, ServiceAccount string
}

// ServerID is the SPIFFE ID of the SPIRE server, the parent of node entries.
func ServerID(trustDomain string) string {
	return "spiffe://" + trustDomain + "/spire/server"
}

// ClusterAliasID is the node alias every agent of the cluster resolves to.
func ClusterAliasID(trustDomain string) string {
	return "spiffe://" + trustDomain + "/meshkeeper/cluster/" + ClusterName
}

// WorkloadID is the SPIFFE ID of a service account, Istio's form.
func WorkloadID(trustDomain string, w Workload) string {
	return fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", trustDomain, w.Namespace, w.ServiceAccount)
}

// Desired is the entries the cluster needs: the node alias, then one entry
// per workload (in the order given), each with its ownership mark.
func Desired(owner Owner, trustDomain string, svidTTL time.Duration, workloads []Workload) []Entry {
	alias := Entry{
		SPIFFEID:  ClusterAliasID(trustDomain),
		ParentID:  ServerID(trustDomain),
		Selectors: []string{selectorPSATCluster + ClusterName},
	}
	alias.ID = owner.ID(alias.SPIFFEID, alias.ParentID)
	out := make([]Entry, 0, len(workloads)+1)
	out = append(out, alias)
	ttl := int32(svidTTL / time.Second)
	for _, w := range workloads {
		e := Entry{
			SPIFFEID: WorkloadID(trustDomain, w),
			ParentID: alias.SPIFFEID,
			// Sorted: "k8s:ns:" < "k8s:sa:".
			Selectors: []string{selectorNamespace + w.Namespace, selectorServiceAccount + w.ServiceAccount},
			X509TTL:   ttl,
		}
		e.ID = owner.ID(e.SPIFFEID, e.ParentID)
		out = append(out, e)
	}
	return out
}

// ErrNotConfigured is what a connector returns when meshkeeper has no way to
// reach a SPIRE server API: registration is then off, and status says so.
var ErrNotConfigured = errors.New("no SPIRE server API configured")
