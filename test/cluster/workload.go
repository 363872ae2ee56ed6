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
