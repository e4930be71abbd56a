//! Cycle groups between stages, for the config pass's "these stages depend on each
//! other" error.

use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};

/// The cycle groups (strongly connected components with a cycle) of a graph of `n`
/// nodes, each sorted, ordered by their smallest node.
pub fn cycles(n: usize, edges: impl IntoIterator<Item = (usize, usize)>) -> Vec<Vec<usize>> {
    let mut g: DiGraph<(), ()> = DiGraph::new();
    for _ in 0..n {
        g.add_node(());
    }
    for (a, b) in edges {
        g.add_edge(NodeIndex::new(a), NodeIndex::new(b), ());
    }
    let mut groups: Vec<Vec<usize>> = tarjan_scc(&g)
        .into_iter()
        .filter(|scc| scc.len() > 1 || g.contains_edge(scc[0], scc[0]))
        .map(|scc| {
            let mut v: Vec<usize> = scc.into_iter().map(|n| n.index()).collect();
            v.sort_unstable();
            v
        })
        .collect();
    groups.sort();
    groups
}

#[cfg(test)]
mod tests {
    use super::cycles;

    #[test]
    fn cycles_are_reported_as_groups() {
        // 0 -> 1 -> 2 -> 0, 3 -> 3, 4 -> 5 (acyclic)
        let groups = cycles(6, [(0, 1), (1, 2), (2, 0), (3, 3), (4, 5)]);
        assert_eq!(groups, vec![vec![0, 1, 2], vec![3]]);
        assert!(cycles(3, [(0, 1), (1, 2)]).is_empty());
    }
}
