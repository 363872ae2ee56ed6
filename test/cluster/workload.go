package cluster

import (
	"context"
	"encoding/json"
	"net/http"
	"time"
)

// WorkloadStats is the test workload's GET /stats.
type WorkloadStats struct {
	Mode      string `json:"mode"`
	OK        int64  `json:"ok"`
	Failed    int64  `json:"failed"`
	LastError string `json:"lastError"`
	// Peers (server) counts answered connections by peer address.
	Peers map[string]int64 `json:"peers"`
}

// GetWorkloadStats reads a workload container's counters from the host
// (pod addresses are on the harness's bridge).
func GetWorkloadStats(ctx context.Context, addr string) (WorkloadStats, error) {
	var s WorkloadStats
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/stats", nil)
	if err != nil {
		return s, err
	}
	resp, err := (&http.Client{Timeout: 2 * time.Second}).Do(req)
	if err != nil {
		return s, err
	}
	defer resp.Body.Close()
	return s, json.NewDecoder(resp.Body).Decode(&s)
}

// StandInCount is one pod's connections in one direction through the
// ztunnel stand-in (test/images/ztunnel-stand-in).
type StandInCount struct {
	Namespace string `json:"namespace"`
	Pod       string `json:"pod"`
	Direction string `json:"direction"`
	OK        int64  `json:"ok"`
	Failed    int64  `json:"failed"`
}

// StandInStats is the ztunnel stand-in's GET /stats (on :15020).
type StandInStats struct {
	Ready     bool           `json:"ready"`
	Workloads int            `json:"workloads"`
	Counts    []StandInCount `json:"counts"`
	// InboundPeers: pod ("namespace/name") -> client address -> inbound
	// connections the stand-in proxied to it.
	InboundPeers map[string]map[string]int64 `json:"inboundPeers"`
	LastError    string                      `json:"lastError"`
}

// InboundFrom is how many inbound connections to a pod from the client
// address ip the stand-in proxied.
func (s StandInStats) InboundFrom(namespace, pod, ip string) int64 {
	return s.InboundPeers[namespace+"/"+pod][ip]
}

// Count returns a pod's count in a direction ("outbound", "inbound",
// "hbone"); zero when the stand-in never had the pod.
func (s StandInStats) Count(namespace, pod, direction string) StandInCount {
	for _, c := range s.Counts {
		if c.Namespace == namespace && c.Pod == pod && c.Direction == direction {
			return c
		}
	}
	return StandInCount{Namespace: namespace, Pod: pod, Direction: direction}
}

// GetStandInStats reads the ztunnel stand-in's counters from the host; addr
// is its pod IP and port 15020.
func GetStandInStats(ctx context.Context, addr string) (StandInStats, error) {
	var s StandInStats
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/stats", nil)
	if err != nil {
		return s, err
	}
	resp, err := (&http.Client{Timeout: 2 * time.Second}).Do(req)
	if err != nil {
		return s, err
	}
	defer resp.Body.Close()
	return s, json.NewDecoder(resp.Body).Decode(&s)
}
