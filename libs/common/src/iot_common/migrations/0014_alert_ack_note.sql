-- 0014: an operator's note when acknowledging an alert (the console asks for one).
ALTER TABLE alerts ADD COLUMN ack_note text CHECK (char_length(ack_note) <= 500);
