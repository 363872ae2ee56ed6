// Command agent is meshkeeper's node agent. So far it runs kernel preflight;
// eBPF redirection and L4 telemetry come with the node agent issue.
package main

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/meshkeeper/meshkeeper/internal/agent"
)

var version = "dev"

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	switch os.Args[1] {
	case "preflight":
		in, err := agent.ReadHost()
		if err != nil {
			fmt.Fprintln(os.Stderr, "preflight:", err)
			os.Exit(1)
		}
		r := agent.Evaluate(in)
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		_ = enc.Encode(r)
		if !r.Eligible {
			os.Exit(3)
		}
	case "version":
		fmt.Println(version)
	default:
		usage()
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, `usage: agent preflight | version
  preflight  check this node's kernel for eBPF redirection; prints JSON, exits 3 when ineligible
  version    print the agent version`)
	os.Exit(2)
}
