package agent

import (
	"errors"
	"fmt"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/rlimit"

	"github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

// FeatureProbe is the result of probing one kernel feature.
type FeatureProbe = v1alpha1.FeatureProbe

// requiredPrograms, requiredMaps and requiredHelpers are exactly what
// bpf/redirect.c uses; TestRequiredHelpersMatchObject keeps them in sync.
var (
	requiredPrograms = []ebpf.ProgramType{ebpf.CGroupSockAddr, ebpf.CGroupSockopt, ebpf.SockOps, ebpf.SkLookup}
	requiredMaps     = []ebpf.MapType{ebpf.Hash, ebpf.Array, ebpf.LRUHash, ebpf.SockHash}
	requiredHelpers  = map[ebpf.ProgramType][]asm.BuiltinFunc{
		ebpf.CGroupSockAddr: {asm.FnMapLookupElem, asm.FnMapUpdateElem, asm.FnMapDeleteElem, asm.FnGetNetnsCookie, asm.FnGetSocketCookie},
		ebpf.CGroupSockopt:  {asm.FnMapLookupElem, asm.FnGetNetnsCookie},
		ebpf.SockOps: {asm.FnMapLookupElem, asm.FnMapUpdateElem, asm.FnMapDeleteElem, asm.FnGetNetnsCookie,
			asm.FnGetSocketCookie, asm.FnSockOpsCbFlagsSet, asm.FnSkcToTcpSock, asm.FnKtimeGetNs, asm.FnSockHashUpdate},
		ebpf.SkLookup: {asm.FnMapLookupElem, asm.FnSkAssign, asm.FnSkRelease},
	}
)

// ProbeFeatures probes the running kernel for every program type, map type
// and per-program-type helper the datapath uses.
func ProbeFeatures() []FeatureProbe {
	// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
	_ = rlimit.RemoveMemlock()
	var out []FeatureProbe
	for _, pt := range requiredPrograms {
		out = append(out, probe("prog/"+progTypeName(pt), features.HaveProgramType(pt)))
	}
	for _, mt := range requiredMaps {
		out = append(out, probe("map/"+mapTypeName(mt), features.HaveMapType(mt)))
	}
	for _, pt := range requiredPrograms {
		for _, fn := range requiredHelpers[pt] {
			out = append(out, probe("helper/"+progTypeName(pt)+"/"+helperName(fn), features.HaveProgramHelper(pt, fn)))
		}
	}
	return out
}

func probe(name string, err error) FeatureProbe {
	p := FeatureProbe{Name: name, Supported: err == nil}
	switch {
	case err == nil:
	case errors.Is(err, ebpf.ErrNotSupported):
		p.Error = "not supported by this kernel"
	default:
		p.Error = err.Error()
	}
	return p
}

// Names as they appear in MeshNode.status.features.
var (
	progTypeNames = map[ebpf.ProgramType]string{
		ebpf.CGroupSockAddr: "cgroup_sock_addr",
		ebpf.CGroupSockopt:  "cgroup_sockopt",
		ebpf.SockOps:        "sock_ops",
		ebpf.SkLookup:       "sk_lookup",
	}
	mapTypeNames = map[ebpf.MapType]string{
		ebpf.Hash:     "hash",
		ebpf.Array:    "array",
		ebpf.LRUHash:  "lru_hash",
		ebpf.SockHash: "sockhash",
	}
	helperNames = map[asm.BuiltinFunc]string{
		asm.FnMapLookupElem:     "map_lookup_elem",
		asm.FnMapUpdateElem:     "map_update_elem",
		asm.FnMapDeleteElem:     "map_delete_elem",
		asm.FnGetNetnsCookie:    "get_netns_cookie",
		asm.FnGetSocketCookie:   "get_socket_cookie",
		asm.FnSockOpsCbFlagsSet: "sock_ops_cb_flags_set",
		asm.FnSkcToTcpSock:      "skc_to_tcp_sock",
		asm.FnKtimeGetNs:        "ktime_get_ns",
		asm.FnSkAssign:          "sk_assign",
		asm.FnSkRelease:         "sk_release",
		asm.FnSockHashUpdate:    "sock_hash_update",
	}
)

func progTypeName(pt ebpf.ProgramType) string { return progTypeNames[pt] }

func mapTypeName(mt ebpf.MapType) string { return mapTypeNames[mt] }

func helperName(fn asm.BuiltinFunc) string { return helperNames[fn] }

// missingFeatures lists the probes that failed.
func missingFeatures(probes []FeatureProbe) []string {
	var missing []string
	for _, p := range probes {
		if !p.Supported {
			missing = append(missing, p.Name)
		}
	}
	return missing
}

func featureReason(probes []FeatureProbe) string {
	m := missingFeatures(probes)
	if len(m) == 0 {
		return ""
	}
	return fmt.Sprintf("missing kernel BPF features: %s", strings.Join(m, ", "))
}
