// Command ztunnel-stand-in stands in for ztunnel in the ztunnel DaemonSet of
// the real-node e2e tests, because upstream ztunnel cannot be built or run
// here. It only serves what the chart's probes and scrapes read: readiness on
// :15021/healthz/ready and an empty metrics page on :15020. It proxies
// nothing; the capture-port listener inside workload pods is the workload
// image's "capture" mode.
package main

import (
	"io"
	"log"
	"net/http"
	"time"
)

func main() {
	go func() {
		mux := http.NewServeMux()
		mux.HandleFunc("/metrics", func(w http.ResponseWriter, _ *http.Request) {
			_, _ = io.WriteString(w, "# ztunnel stand-in: no metrics\n")
		})
		srv := &http.Server{Addr: ":15020", Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		log.Fatal(srv.ListenAndServe())
	}()
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz/ready", func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ready\n") })
	srv := &http.Server{Addr: ":15021", Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	log.Fatal(srv.ListenAndServe())
}
