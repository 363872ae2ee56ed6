// Command meshkeeper-cni is meshkeeper's chained CNI plugin. The node
// agent copies it into the node's CNI bin directory and chains it last
// into the node's conflist. On ADD it passes the previous plugin's result
// through and, for a pod that is not in an excluded namespace, asks the
// node agent over its unix socket to enrol the pod's network namespace
// (the namespace's fd travels with the request) and waits until that is
// done, so no meshed pod starts before its traffic is redirected. When the
// agent does not answer in time, the ADD fails and the kubelet retries: a
// meshed pod never starts unmeshed (fail closed). DEL tells the agent and
// never fails. See internal/agent/cni.
package main

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/meshkeeper/meshkeeper/internal/agent/cni"
)

// netConf is the plugin's stdin: the standard fields and its own.
type netConf struct {
	types.PluginConf
	Socket            string   `json:"socket"`
	Timeout           string   `json:"timeout,omitempty"`
	ExcludeNamespaces []string `json:"excludeNamespaces,omitempty"`
}

func (c *netConf) own() cni.PluginConf {
	return cni.PluginConf{Socket: c.Socket, Timeout: c.Timeout, ExcludeNamespaces: c.ExcludeNamespaces}
}

// k8sArgs are the CNI_ARGS the container runtime passes for a pod.
type k8sArgs struct {
	types.CommonArgs
	K8S_POD_NAMESPACE          types.UnmarshallableString // the runtime's names
	K8S_POD_NAME               types.UnmarshallableString
	K8S_POD_INFRA_CONTAINER_ID types.UnmarshallableString
	K8S_POD_UID                types.UnmarshallableString
}

func parse(args *skel.CmdArgs) (*netConf, cni.Pod, error) {
	var c netConf
	if err := json.Unmarshal(args.StdinData, &c); err != nil {
		return nil, cni.Pod{}, fmt.Errorf("meshkeeper-cni: parse the network configuration: %w", err)
	}
	var k k8sArgs
	if err := types.LoadArgs(args.Args, &k); err != nil {
		return nil, cni.Pod{}, fmt.Errorf("meshkeeper-cni: parse CNI_ARGS: %w", err)
	}
	return &c, cni.Pod{Namespace: string(k.K8S_POD_NAMESPACE), Name: string(k.K8S_POD_NAME), UID: string(k.K8S_POD_UID)}, nil
}

func cmdAdd(args *skel.CmdArgs) error {
	c, pod, err := parse(args)
	if err != nil {
		return err
	}
	if err := version.ParsePrevResult(&c.PluginConf); err != nil {
		return fmt.Errorf("meshkeeper-cni: %w", err)
	}
	if _, err := cni.PluginAdd(context.Background(), c.own(), pod, args.ContainerID, args.Netns); err != nil {
		return err
	}
	result := c.PrevResult
	if result == nil {
		// Chained first, or no plugin before it returned anything: an
		// empty result of the configuration's version.
		result = &current.Result{CNIVersion: current.ImplementedSpecVersion}
	}
	return types.PrintResult(result, c.CNIVersion)
}

func cmdDel(args *skel.CmdArgs) error {
	c, pod, err := parse(args)
	if err != nil {
		return nil // never fail a teardown
	}
	cni.PluginDel(context.Background(), c.own(), pod, args.ContainerID, args.Netns)
	return nil
}

func cmdCheck(args *skel.CmdArgs) error {
	c, pod, err := parse(args)
	if err != nil {
		return err
	}
	return cni.PluginCheck(context.Background(), c.own(), pod, args.ContainerID, args.Netns)
}

func main() {
	skel.PluginMainFuncs(skel.CNIFuncs{Add: cmdAdd, Del: cmdDel, Check: cmdCheck}, version.All,
		"meshkeeper-cni: enrols a meshed pod's network namespace with the meshkeeper node agent before the pod starts")
}
