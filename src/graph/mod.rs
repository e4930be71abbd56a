//! The pipeline as a DAG (petgraph): which stage reads which, in what order they can run.

use petgraph::Direction;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::{Dfs, EdgeRef, Reversed};

use crate::config::PipelineSpec;

/// A checked pipeline compiled into a DAG. Node `i` is `spec.stages[i]`; an edge runs
/// from a stage to each stage that reads it, weighted with the reference text.
pub struct Plan {
    pub spec: PipelineSpec,
    graph: DiGraph<usize, String>,
    order: Vec<usize>,
}

impl Plan {
    /// Compiles a spec. The config pass has already rejected unknown references and cycles.
    pub fn new(spec: PipelineSpec) -> Plan {
        let mut graph = DiGraph::new();
        for i in 0..spec.stages.len() {
            graph.add_node(i);
        }
        for (to, s) in spec.stages.iter().enumerate() {
            for (_, r) in s.stage.inputs() {
                if let Some(from) = spec.stages.iter().position(|t| t.id == r.stage()) {
                    graph.add_edge(NodeIndex::new(from), NodeIndex::new(to), r.0.clone());
                }
            }
        }
        let order = stable_topo_order(&graph);
        Plan { spec, graph, order }
    }

    /// Stage indices in an order where every stage comes after what it reads.
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    pub fn len(&self) -> usize {
        self.spec.stages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spec.stages.is_empty()
    }

    /// The stages `i` reads directly (deduplicated, in index order).
    pub fn dependencies(&self, i: usize) -> Vec<usize> {
        let mut deps: Vec<usize> = self
            .graph
            .neighbors_directed(NodeIndex::new(i), Direction::Incoming)
            .map(|n| n.index())
            .collect();
        deps.sort_unstable();
        deps.dedup();
        deps
    }

    /// Every stage that reads `i`, directly or not.
    pub fn descendants(&self, i: usize) -> Vec<usize> {
        let mut dfs = Dfs::new(&self.graph, NodeIndex::new(i));
        let mut out = Vec::new();
        while let Some(n) = dfs.next(&self.graph) {
            if n.index() != i {
                out.push(n.index());
            }
        }
        out
    }

    /// Every stage `i` reads, directly or not.
    pub fn ancestors(&self, i: usize) -> Vec<usize> {
        let rev = Reversed(&self.graph);
        let mut dfs = Dfs::new(rev, NodeIndex::new(i));
        let mut out = Vec::new();
        while let Some(n) = dfs.next(rev) {
            if n.index() != i {
                out.push(n.index());
            }
        }
        out
    }

    /// Graphviz text of the DAG.
    pub fn to_dot(&self) -> String {
        let mut s = format!(
            "digraph {} {{\n  rankdir=LR;\n  node [shape=box, fontname=\"Helvetica\"];\n",
            quote(&self.spec.name)
        );
        for &i in &self.order {
            let st = &self.spec.stages[i];
            s += &format!(
                "  {} [label={}];\n",
                quote(&st.id),
                quote(&format!("{}\n({})", st.id, st.stage.kind()))
            );
        }
        for e in self.graph.edge_references() {
            let (from, to) = (
                &self.spec.stages[e.source().index()].id,
                &self.spec.stages[e.target().index()].id,
            );
            let port = e
                .weight()
                .split_once('.')
                .map(|(_, p)| format!(" [label={}]", quote(p)))
                .unwrap_or_default();
            s += &format!("  {} -> {}{port};\n", quote(from), quote(to));
        }
        s + "}\n"
    }

    /// The DAG as JSON: `{"nodes": [{"id", "kind", "inputs"}], "edges": [{"from", "to", "ref"}]}`.
    pub fn to_json(&self) -> serde_json::Value {
        let nodes: Vec<_> = self
            .order
            .iter()
            .map(|&i| {
                let st = &self.spec.stages[i];
                let inputs: Vec<&str> = st
                    .stage
                    .inputs()
                    .into_iter()
                    .map(|(_, r)| r.0.as_str())
                    .collect();
                serde_json::json!({"id": st.id, "kind": st.stage.kind(), "inputs": inputs})
            })
            .collect();
        let edges: Vec<_> = self
            .graph
            .edge_references()
            .map(|e| {
                serde_json::json!({
                    "from": self.spec.stages[e.source().index()].id,
                    "to": self.spec.stages[e.target().index()].id,
                    "ref": e.weight(),
                })
            })
            .collect();
        serde_json::json!({"pipeline": self.spec.name, "nodes": nodes, "edges": edges})
    }
}

/// Kahn's algorithm taking the smallest ready index first: stages are sorted by id, so
/// the order (and what `-j 1` runs first) is the same on every run.
fn stable_topo_order(graph: &DiGraph<usize, String>) -> Vec<usize> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let n = graph.node_count();
    let mut indegree: Vec<usize> = (0..n)
        .map(|i| {
            graph
                .neighbors_directed(NodeIndex::new(i), Direction::Incoming)
                .count()
        })
        .collect();
    let mut ready: BinaryHeap<Reverse<usize>> =
        (0..n).filter(|&i| indegree[i] == 0).map(Reverse).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for e in graph.edges_directed(NodeIndex::new(i), Direction::Outgoing) {
            let t = e.target().index();
            indegree[t] -= 1;
            if indegree[t] == 0 {
                ready.push(Reverse(t));
            }
        }
    }
    order
}

fn quote(s: &str) -> String {
    format!(
        "\"{}\"",
        s.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    )
}
