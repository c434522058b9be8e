"""Published data for the Hadamard orders that have no Paley form (156 = 4·39, 172 = 4·43).

Williamson quadruples: the first rows ('+' = 1, '-' = -1) of four symmetric circulant
blocks A, B, C, D of odd order w with AAᵀ + BBᵀ + CCᵀ + DDᵀ = 4w·I. The Williamson array
[[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]] is then a Hadamard matrix
of order 4w (built and checked exactly in `quant_core.hadamard`).

Sources (as tabulated in SageMath, `williamson_type_quadruples_smallcases` in
src/sage/combinat/matrices/hadamard_matrix.py):
- w = 43: M. Hall Jr., "Combinatorial Theory", 2nd ed., Wiley, 1983 (Baumert–Hall).
- w = 39: S. London, "Constructing New Turyn Type Sequences, T-Sequences and Hadamard
  Matrices", PhD thesis, University of Illinois at Chicago, 2013.
"""

WILLIAMSON_ROWS = {
    39: (
        "+++--+-+-----+--++----++--+-----+-+--++",
        "+++--++-+---+-+--+----+--+-+---+-++--++",
        "++++---+--++----+-+--+-+----++--+---+++",
        "+---++-+-+-----+++-++-+++-----+-+-++---",
    ),
    43: (
        "++---++++-+--+--++--------++--+--+-++++---+",
        "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
        "++-++++++----+-+--++-++-++--+-+----++++++-+",
        "+---++--++++-+-+++-++--++-+++-+-++++--++---",
    ),
}
