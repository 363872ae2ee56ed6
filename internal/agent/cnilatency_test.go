package agent

import (
	"context"
	"fmt"
	"os"
	"slices"
	"testing"
	"time"

	. "github.com/onsi/gomega"
)

// BenchmarkCNIEnrolHandoff profiles where the agent's side of a CNI ADD's
// time goes with the ZDS hand-off: the whole EnrolNetns (what the plugin
// waits for), the ZDS add and its ack alone (the test client acks at once,
// with none of ztunnel's own work), and the netns cookie read. It enrols 40
// fresh network namespaces and reports medians and p90s in µs.
func BenchmarkCNIEnrolHandoff(b *testing.B) {
	requirePrivileged(b)
	const pods = 40
	g := NewWithT(b)
	s := newZDSScenario(b)
	s.connect(b)
	var total, handoff, cookie []time.Duration
	for i := range pods {
		ns := newTestNetns(b)
		f, err := os.Open(ns.Path)
		g.Expect(err).NotTo(HaveOccurred())
		ref := PodRef{Namespace: "bench", Name: fmt.Sprintf("p-%02d", i), UID: fmt.Sprintf("00000000-0000-4000-9000-%012d", i)}

		t0 := time.Now()
		_, err = fileNetnsCookie(f)
		cookie = append(cookie, time.Since(t0))
		g.Expect(err).NotTo(HaveOccurred())

		t0 = time.Now()
		err = s.server.AddWorkload(context.Background(), ref.UID+"-zds", f, workloadInfo(ref))
		handoff = append(handoff, time.Since(t0))
		g.Expect(err).NotTo(HaveOccurred())

		t0 = time.Now()
		err = s.enroller.EnrolNetns(context.Background(), ref, f)
		total = append(total, time.Since(t0))
		g.Expect(err).NotTo(HaveOccurred())
		f.Close()
	}
	q := func(d []time.Duration, p float64) float64 {
		slices.Sort(d)
		return float64(d[int(p*float64(len(d)-1))].Microseconds())
	}
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(q(total, 0.5), "enrol-p50-µs")
	b.ReportMetric(q(total, 0.9), "enrol-p90-µs")
	b.ReportMetric(q(handoff, 0.5), "zds-ack-p50-µs")
	b.ReportMetric(q(handoff, 0.9), "zds-ack-p90-µs")
	b.ReportMetric(q(cookie, 0.5), "cookie-p50-µs")
	b.ReportMetric(q(cookie, 0.9), "cookie-p90-µs")
}
